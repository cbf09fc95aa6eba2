"""Attention shim: the backends agree numerically; the decision point picks what the table says."""

import math

import pytest
import torch

from picochat.ops import attention


def _qkv(B=2, T=48, H=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hkv, D, generator=g),
            torch.randn(B, T, Hkv, D, generator=g))


def _naive(q, k, v, window):
    """Reference: explicit softmax over allowed keys, loops over nothing clever."""
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j) < (window or T + 1))
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("backend", ["sdpa", "math", "mask"])
@pytest.mark.parametrize("window", [None, 16])
def test_backends_match_reference(monkeypatch, backend, window):
    monkeypatch.setenv("PICOCHAT_ATTN", backend)
    q, k, v = _qkv()
    y = attention.causal_attention(q, k, v, window=window)
    assert torch.allclose(y, _naive(q, k, v, window), atol=1e-5)


@pytest.mark.parametrize("window", [None, 16])
def test_flex_on_cpu_matches_reference(monkeypatch, window):
    monkeypatch.setenv("PICOCHAT_ATTN", "flex")
    q, k, v = _qkv(T=128, H=2, Hkv=2)
    try:
        y = attention.causal_attention(q, k, v, window=window)
    except Exception as e:  # torch builds without CPU flex support
        pytest.skip(f"FlexAttention unavailable on CPU here: {type(e).__name__}: {e}")
    assert torch.allclose(y, _naive(q, k, v, window), atol=1e-4)


def test_cached_attention_in_chunks_equals_full(monkeypatch):
    q, k, v = _qkv()
    for window in (None, 16):
        full = attention.causal_attention(q, k, v, window=window)
        parts = [attention.cached_attention(q[:, :20], k[:, :20], v[:, :20], 0, window)]
        parts.append(attention.cached_attention(q[:, 20:21], k[:, :21], v[:, :21], 20, window))
        parts.append(attention.cached_attention(q[:, 21:], k, v, 21, window))
        assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_choose(monkeypatch):
    monkeypatch.delenv("PICOCHAT_ATTN", raising=False)
    cpu = torch.device("cpu")
    assert attention.choose(cpu, None, 2048) == "sdpa"
    assert attention.choose(cpu, 512, 2048) == "mask"
    assert attention.choose(cpu, 4096, 2048) == "sdpa"  # a window as long as the context is full causal
    monkeypatch.setenv("PICOCHAT_ATTN", "cudnn")
    assert attention.choose(cpu, None, 2048) == "sdpa"  # no cuDNN on CPU: never a crash
    monkeypatch.setenv("PICOCHAT_ATTN", "bogus")
    with pytest.raises(ValueError, match="PICOCHAT_ATTN"):
        attention.choose(cpu, None, 2048)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_agree():
    dev = torch.device("cuda")
    q, k, v = (t.to(dev, torch.bfloat16) for t in _qkv(T=256, D=64))
    for window in (None, 64):
        ref = _naive(*(t.float().cpu() for t in (q, k, v)), window)
        y = attention.causal_attention(q, k, v, window=window).float().cpu()
        assert torch.allclose(y, ref, atol=3e-2)


def _decode_case(B, Hkv, G, D, P, S, n, pos, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return (r(B, Hkv, G, D), r(P, Hkv, D), r(P, Hkv, D), r(B, S, Hkv, D), r(B, S, Hkv, D),
            torch.tensor([n], device=device), torch.tensor([pos], device=device))


@pytest.mark.parametrize("window", [None, 5])
def test_decode_reference_is_attention_over_prompt_then_own_tokens(window):
    """The shared-prompt decode definition = plain causal attention over [prompt, row's generated tokens]."""
    B, Hkv, G, D, P, S, n, pos = 3, 2, 2, 8, 12, 6, 9, 12  # prompt 9 (capacity 12), 4 generated (index 0..3)
    q, kp, vp, ks, vs, npre, p = _decode_case(B, Hkv, G, D, P, S, n, pos, "cpu", torch.float32)
    y = attention.decode_attention_reference(q, kp, vp, ks, vs, npre, p, window)
    for b in range(B):
        k = torch.cat([kp[:n], ks[b, : pos - n + 1]])  # (n + 4, Hkv, D): the visible keys in position order
        v = torch.cat([vp[:n], vs[b, : pos - n + 1]])
        if window is not None:
            k, v = k[-window:], v[-window:]
        for h in range(Hkv):
            s = q[b, h] @ k[:, h].T / math.sqrt(D)
            ref = torch.softmax(s, -1) @ v[:, h]
            torch.testing.assert_close(y[b, h], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,Hkv,G,P,S,n,pos,window", [
    (1, 10, 1, 512, 256, 512, 600, None), (64, 10, 1, 512, 256, 500, 627, None), (8, 2, 4, 256, 256, 37, 37, None),
    (3, 4, 2, 768, 512, 700, 900, 128), (20, 3, 1, 256, 256, 256, 300, 64)])
def test_triton_decode_matches_reference(B, Hkv, G, P, S, n, pos, window):
    from picochat.ops import kernels

    if not kernels.available():
        pytest.skip("triton missing")
    q, kp, vp, ks, vs, npre, p = _decode_case(B, Hkv, G, 128, P, S, n, pos, "cuda", torch.bfloat16)
    y = kernels.decode_attention(q, kp, vp, ks, vs, npre, p, window)
    ref = attention.decode_attention_reference(q.float(), kp.float(), vp.float(), ks.float(), vs.float(), npre, p,
                                               window)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
