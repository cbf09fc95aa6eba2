"""Fast ops: attention, RoPE, the training loss, Triton kernels, fp8 — each falls back loudly off CUDA."""
