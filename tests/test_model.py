"""The GPT: forward/backward, init statistics, accounting from shapes, fused loss, KV cache equivalence."""

import math

import pytest
import torch

from picochat.ops.loss import fused_linear_cross_entropy
from picochat.model import GPT, GPTConfig, build_model, flops_per_token, num_scaling_params


pytestmark = pytest.mark.usefixtures("one_thread")


CFG = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def _model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def test_forward_backward_and_initial_loss():
    m = _model()
    idx = torch.randint(0, CFG.vocab_size, (2, 64))
    logits = m(idx)
    assert logits.shape == (2, 64, CFG.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() <= CFG.softcap
    loss = m(idx, idx)
    # lm_head starts near zero, so the first loss is ~ln(V): a broken init shows up here
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.05
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.lm_head.weight.grad.abs().sum() > 0 and m.blocks[0].attn.c_proj.weight.grad.abs().sum() > 0


def test_init_statistics():
    cfg = GPTConfig(sequence_len=64, vocab_size=1024, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)
    m = _model(cfg)
    assert abs(m.wte.weight.std().item() - 0.8) < 0.02
    assert abs(m.lm_head.weight.std().item() - 0.001) < 1e-4
    d = cfg.n_embd
    assert abs(m.blocks[0].attn.c_q.weight.std().item() - d ** -0.5) < 0.005
    assert abs(m.blocks[0].mlp.c_fc.weight.std().item() - 0.4 * d ** -0.5) < 0.003
    for b in m.blocks:
        assert b.attn.c_proj.weight.abs().sum() == 0 and b.mlp.c_proj.weight.abs().sum() == 0
    assert torch.allclose(m.resid_lambdas[[0, -1]], torch.tensor([1.15, 1.05]))
    assert torch.allclose(m.x0_lambdas[[0, -1]], torch.tensor([0.20, 0.05]))
    assert set(m.value_embeds.keys()) == {"1", "3"}  # alternating, including the last layer
    assert m.lm_head.weight.shape[0] == 1024 and GPTConfig(vocab_size=1000).padded_vocab_size == 1024


def test_accounting_from_shapes():
    c = GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                  window_pattern="SSSL")
    assert num_scaling_params(c) == 12 * 12 * 768 ** 2 + 768 * 32768 == 110_100_480
    # attention: 12 * H * hd * span per layer; S layers see 512 keys, L (and the forced-L last layer) 2048
    spans = [512, 512, 512, 2048] * 3
    assert flops_per_token(c) == 6 * 110_100_480 + sum(12 * 6 * 128 * s for s in spans)
    with torch.device("meta"):
        m = GPT(c)
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    assert m.flops_per_token() == flops_per_token(c)
    gqa = GPTConfig(n_layer=1, n_head=8, n_kv_head=2, n_embd=512, vocab_size=64)
    assert num_scaling_params(gqa) == 512 * 512 * 2 + 512 * 128 * 2 + 8 * 512 ** 2 + 512 * 64


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_matches_plain_path(reduction):
    m = _model()
    with torch.no_grad():  # make every gradient path non-trivial
        for b in m.blocks:
            b.attn.c_proj.weight.normal_(0, 0.02)
            b.mlp.c_proj.weight.normal_(0, 0.02)
        m.lm_head.weight.normal_(0, 0.05)
    idx = torch.randint(0, CFG.vocab_size, (3, 64))
    tgt = torch.randint(0, CFG.vocab_size, (3, 64))
    tgt[0, :17] = -1
    grads, losses = [], []
    for fused in (True, False):
        m.fused_loss = fused
        m.zero_grad()
        loss = m(idx, tgt, loss_reduction=reduction)
        (loss * 1.7).backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6), n
    # chunking does not change the result
    x = torch.randn(50, 64, requires_grad=True)
    w = torch.randn(320, 64, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    a = fused_linear_cross_entropy(x, w, t, 300, 15.0, reduction, chunk=7)
    b = fused_linear_cross_entropy(x, w, t, 300, 15.0, reduction, chunk=64)
    assert torch.allclose(a, b, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton)")
@pytest.mark.parametrize("dtype,V", [(torch.float32, 1000), (torch.bfloat16, 32768)])
def test_softcap_ce_kernel_matches_torch_definition(dtype, V):
    from picochat.ops import kernels
    from picochat.ops.loss import _softcap_ce_torch

    torch.manual_seed(0)
    z = (torch.randn(300, V, device="cuda") * 8).to(dtype)  # spans the softcap's curved range
    t = torch.randint(0, V, (300,), device="cuda")
    t[::7] = -1
    loss_k, g_k = kernels.softcap_ce(z, t, 15.0)
    loss_t, g_t = _softcap_ce_torch(z, t, 15.0)
    assert g_k.dtype == dtype and loss_k.dtype == torch.float32
    assert torch.allclose(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    assert (loss_k[::7] == 0).all() and (g_k[::7] == 0).all()
    # fp32: the kernel's tanh (via sigmoid) and exp differ from torch's in the last bits; bf16: one rounding step
    rtol, atol = (2e-4, 1e-6) if dtype == torch.float32 else (1e-2, 1e-5)
    assert torch.allclose(g_k.float(), g_t.float(), rtol=rtol, atol=atol)
    assert torch.allclose(g_k.float().sum(1), g_t.float().sum(1), atol=1e-3)  # softmax - onehot rows sum near 0


def _triton_device() -> str | None:
    """CUDA, or the CPU under the Triton interpreter (TRITON_INTERPRET=1), or None (no Triton to test)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.mark.skipif(_triton_device() is None, reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_norm_kernel_matches_torch_definition(dtype):
    """The fused RoPE + QK-norm op (forward and backward) against autograd through the torch definition, with the
    incoming gradient in the (B, H, T, D)-contiguous layout attention's backward hands it."""
    from picochat.ops.rope import _rope_norm_op, rope_norm_torch

    dev = _triton_device()
    torch.manual_seed(0)
    B, T, H, D = 2, 40, 3, 32
    x = (torch.randn(B, T, H, D, device=dev) * 3).to(dtype).requires_grad_()
    ang = torch.rand(T, D // 2, device=dev) * 6
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    dy = torch.randn(B, H, T, D, device=dev).to(dtype).transpose(1, 2)  # strides of a (B, H, T, D) tensor
    ref = rope_norm_torch(x.float(), cos.float()[None, :, None], sin.float()[None, :, None])
    (gref,) = torch.autograd.grad(ref, x, dy.float())
    y, rstd = _rope_norm_op(x, cos, sin, torch.finfo(dtype).eps)
    (g,) = torch.autograd.grad(y, x, dy)
    assert y.dtype == dtype and g.dtype == dtype and rstd.shape == (B, T, H)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(y.float(), ref, **tol)
    # bf16: the backward uses the saved bf16 y, so compare the whole gradient's relative error
    err = ((g.float() - gref).norm() / gref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
    # the output rows have unit RMS (up to eps), i.e. the norm really ran after the rotation
    assert torch.allclose(y.float().pow(2).mean(-1), torch.ones(B, T, H, device=dev), atol=2e-2)


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_kv_cache_decode_equals_full_forward(pattern):
    # seq 512 -> S window 128 < the 200 tokens decoded, so windows really cut
    cfg = GPTConfig(sequence_len=512, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                    window_pattern=pattern)
    assert (cfg.window_sizes()[0] == 128) == (pattern == "SL")
    m = _live(_model(cfg))
    idx = torch.randint(0, 300, (2, 200))
    with torch.no_grad():
        full = m(idx)
        cache = m.kv_cache(2, 200)
        out = [m(idx[:, :150], kv_cache=cache)]
        for t in range(150, 200):
            out.append(m(idx[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 200
    assert torch.allclose(torch.cat(out, dim=1), full, atol=1e-4)


def test_prefill_logits_at_equals_full_forward_rows():
    # a 100-token prefill under a 128-token window: the window covers every key, so the cached path drops the mask;
    # logits_at computes only the asked positions, equal to those rows of the full forward
    cfg = GPTConfig(sequence_len=512, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
    m = _live(_model(cfg))
    idx = torch.randint(0, 300, (2, 100))
    with torch.no_grad():
        full = m(idx)
        cache = m.kv_cache(2, 128)
        at = torch.tensor([99, 10])
        part = m(idx, kv_cache=cache, logits_at=at)
    assert part.shape == (2, 2, 300)
    assert torch.allclose(part, full[:, [99, 10]], atol=1e-4)
    with pytest.raises(ValueError, match="without targets"):
        m(idx, targets=idx, logits_at=at)


def test_config_validation():
    from picochat.config import ConfigError

    with pytest.raises(ConfigError, match="n_kv_head"):
        build_model(GPTConfig(n_layer=1, n_head=4, n_kv_head=3, n_embd=64, vocab_size=64))
    with pytest.raises(ConfigError, match="window_pattern"):
        build_model(GPTConfig(n_layer=1, n_head=2, n_kv_head=2, n_embd=64, vocab_size=64, window_pattern="X"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern,extras", [("L", False), ("SSSL", True)])
def test_cuda_compiled_model_has_no_graph_breaks_and_matches_eager(pattern, extras):
    """fullgraph=True fails on any graph break (SDPA/flex attention, fused loss, value embeds, smear, backout)."""
    from picochat.ops import attention

    cfg = GPTConfig(sequence_len=512, vocab_size=1000, n_layer=4, n_head=4, n_kv_head=4, n_embd=256,
                    window_pattern=pattern, smear=extras, backout=extras)
    torch.manual_seed(0)
    m = build_model(cfg, device="cuda").set_compute_dtype(torch.bfloat16)
    attention.prepare(m.window_sizes, cfg.sequence_len, torch.device("cuda"))
    idx = torch.randint(0, 1000, (4, 512), device="cuda")
    eager = m(idx, idx)
    eager.backward()
    g_eager = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    cm = torch.compile(m, dynamic=False, fullgraph=True)
    loss = cm(idx, idx)
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=2e-2)
    for n, p in m.named_parameters():  # bf16: compare as relative error of the whole gradient
        if p.numel() < 64:
            # per-layer scalars: each grad is one sum of ~10^5 cancelling bf16 products, so eager and compiled
            # (which reduce in a different order/precision) agree only loosely; require finite and same scale
            assert torch.isfinite(p.grad).all() and p.grad.abs().max() <= 4 * g_eager[n].abs().max() + 1e-3, n
            continue
        err = (p.grad - g_eager[n]).norm() / g_eager[n].norm().clamp_min(1e-12)
        assert err < 0.05, (n, err.item())


# ----------------------------------------------------------------------------------------------------------------
# Smear and backout (nanochat HEAD)

SB = GPTConfig(sequence_len=128, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, smear=True,
               backout=True)


def _live(m):
    """Non-trivial weights everywhere: the blocks do something, the smear is on (its lambda starts at 0)."""
    with torch.no_grad():
        for b in m.blocks:
            b.attn.c_proj.weight.normal_(0, 0.05)
            b.mlp.c_proj.weight.normal_(0, 0.05)
        m.lm_head.weight.normal_(0, 0.05)
        if m.smear_gate is not None:
            m.smear_lambda.fill_(0.7)
            m.smear_gate.weight.normal_(0, 0.5)
    return m


def test_smear_backout_init_and_parameters():
    m = _model(SB)
    assert m.smear_gate.weight.shape == (1, 24) and 0 <= m.smear_gate.weight.min() and m.smear_gate.weight.max() <= 0.02
    assert m.smear_lambda.item() == 0.0 and m.backout_lambda.item() == pytest.approx(0.2)
    plain = _model(CFG)
    assert plain.smear_gate is None and plain.smear_lambda is None and plain.backout_lambda is None
    assert {n for n, _ in m.named_parameters()} - {n for n, _ in _model(GPTConfig(**{**SB.__dict__, "smear": False,
                                                                                   "backout": False})).named_parameters()} \
        == {"smear_gate.weight", "smear_lambda", "backout_lambda"}
    assert flops_per_token(SB) == flops_per_token(GPTConfig(**{**SB.__dict__, "smear": False, "backout": False}))
    # every new parameter gets a gradient
    loss = _live(m)(torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32)))
    loss.backward()
    for n in ("smear_gate.weight", "smear_lambda", "backout_lambda"):
        g = m.get_parameter(n).grad
        assert g is not None and g.abs().sum() > 0, n


def test_smear_mixes_previous_token_only():
    """Blocks at their zero init (identity) and backout off: the output at t depends on tokens t and t-1 only, and
    position 0 on its own token only."""
    cfg = GPTConfig(**{**SB.__dict__, "backout": False})
    m = _model(cfg)
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 0.05)
        m.smear_lambda.fill_(1.0)
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        base = m(idx)
        # position 0: changing nothing before it is possible, so check it equals the no-smear model's output
        m.smear_lambda.zero_()
        no_smear = m(idx)
        m.smear_lambda.fill_(1.0)
        changed = idx.clone()
        changed[0, 3] = (idx[0, 3] + 1) % 300
        out = m(changed)
    assert torch.equal(base[:, 0], no_smear[:, 0])
    assert not torch.allclose(base[:, 1:], no_smear[:, 1:], atol=1e-4)  # the smear does something elsewhere
    diff = (out - base).abs().amax(dim=-1)[0]
    assert diff[3] > 1e-4 and diff[4] > 1e-4  # token 3 itself, and token 4 through the smear
    assert torch.all(diff[[0, 1, 2, 5, 6, 7]] == 0)


def test_backout_subtracts_mid_residual():
    cfg = GPTConfig(**{**SB.__dict__, "smear": False})
    m = _live(_model(cfg))
    idx = torch.randint(0, 300, (2, 16))
    outs = {}
    for i in (1, 2):  # n_layer 3: the residual after block 3 // 2 = 1 is subtracted from the last block's output
        m.blocks[i].register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out))
    with torch.no_grad():
        on = m(idx)
        from picochat.model import rms_norm

        z = m.lm_head(rms_norm(outs[2] - 0.2 * outs[1]))[..., :cfg.vocab_size]
        expect = cfg.softcap * torch.tanh(z / cfg.softcap)
        m.backout_lambda.zero_()
        off = m(idx)
    assert torch.allclose(on, expect, atol=1e-6)
    assert not torch.allclose(on, off, atol=1e-4)  # lambda 0 is the plain model, 0.2 is not


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_smear_backout_kv_cache_decode_equals_full_forward(pattern):
    cfg = GPTConfig(**{**SB.__dict__, "sequence_len": 256, "window_pattern": pattern})
    m = _live(_model(cfg))
    idx = torch.randint(0, 300, (2, 160))
    with torch.no_grad():
        full = m(idx)
        cache = m.kv_cache(2, 160)
        out = [m(idx[:, :1], kv_cache=cache), m(idx[:, 1:100], kv_cache=cache)]  # chunked prefill, then decode
        for t in range(100, 160):
            out.append(m(idx[:, t:t + 1], kv_cache=cache))
        # a batch-1 prefill broadcast into a batch-2 cache (how the engine starts several samples) carries prev_embed
        one = m.kv_cache(1, 160)
        m(idx[:1, :100], kv_cache=one)
        two = m.kv_cache(2, 160)
        two.copy_from(one)
        nxt = m(idx[:1, 100:101].expand(2, 1), kv_cache=two)
    assert cache.pos == 160
    assert torch.allclose(torch.cat(out, dim=1), full, atol=1e-5), (torch.cat(out, dim=1) - full).abs().max()
    assert torch.allclose(nxt, full[:1, 100:101].expand(2, 1, -1), atol=1e-5)
    # without the cached previous embedding the first decoded token would differ: the cache really carries it
    cache2 = m.kv_cache(2, 160)
    with torch.no_grad():
        m(idx[:, :100], kv_cache=cache2)
        cache2.prev_embed.zero_()
        wrong = m(idx[:, 100:101], kv_cache=cache2)
    assert not torch.allclose(wrong, full[:, 100:101], atol=1e-4)


def test_saved_config_without_new_keys_builds_plain_model(monkeypatch):
    import dataclasses

    saved = dataclasses.asdict(CFG)
    del saved["smear"], saved["backout"]  # a checkpoint written before the features existed
    cfg = GPTConfig.from_saved(saved)
    assert cfg == CFG and not cfg.smear and not cfg.backout
    assert GPTConfig.from_saved(dataclasses.asdict(SB)) == SB  # flags that were saved are kept
    # even once the defaults are on, an old checkpoint's model is the plain one its weights belong to
    monkeypatch.setattr(GPTConfig.__init__, "__defaults__",
                        tuple(True if f.name in ("smear", "backout") else f.default
                              for f in dataclasses.fields(GPTConfig)))
    assert GPTConfig().smear and GPTConfig().backout
    old = GPTConfig.from_saved(saved)
    assert not old.smear and not old.backout
    m = build_model(old)
    m.load_state_dict(_model(CFG).state_dict(), strict=True)


@pytest.mark.skipif(_triton_device() is None, reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
def test_sampler_per_row_launch_draws_as_each_request_alone():
    """The server's one-launch draw over the rows of many requests (own seed, noise row and temperature per row)
    gives each row the token its own launch would, and leaves the shared scratch zeroed for the next launch."""
    from picochat.ops import kernels

    dev = _triton_device()
    torch.manual_seed(0)
    V = 3000
    logits = torch.randn(5, V, device=dev)
    seeds, rows, temps = [11, 22, 33, 33, 44], [0, 0, 0, 1, 0], [1.0, 0.7, 1.3, 1.3, 0.5]
    alone = []
    for j in (0, 1, 2, 4):  # rows 2 and 3 are one request's two choices: one launch of two rows
        n = 2 if j == 2 else 1
        alone += kernels.sample(logits[j:j + n].contiguous(), temps[j], seeds[j]).tolist()
    scratch = torch.zeros(2, 8, dtype=torch.long, device=dev)
    out = torch.empty(5, dtype=torch.long, device=dev)
    kernels.sample_rows(logits, kernels.sample_params(temps, seeds, rows).to(dev), out, scratch)
    assert out.tolist() == alone
    assert not scratch.any()
    assert len(set(alone)) > 1  # not one constant token


@pytest.mark.skipif(_triton_device() is None, reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
def test_server_draw_truncates_per_row_and_ignores_the_other_rows():
    """The server's one-launch draw with per-row top-k / top-p: top-k 1 and a tiny top-p give the argmax, top-k 3
    stays among the 3 best, an untruncated row draws what the engine's sampler draws alone, and every row draws
    the same token alone as in a batch of rows truncated otherwise."""
    from picochat.ops import kernels
    from picochat.engine import gumbel_draw

    dev = _triton_device()
    torch.manual_seed(1)
    V = 500
    logits = torch.randn(6, V, device=dev) * 2
    temps, keys, noise = [1.0, 0.8, 1.2, 1.0, 0.9, 1.1], [5, 6, 7, 8, 9, 10], [0] * 6
    ks, ps = [1, 0, 3, 0, 3, 40], [1.0, 1e-6, 1.0, 1.0, 0.9, 0.5]
    scratch = torch.zeros(2, 8, dtype=torch.long, device=dev)
    both = gumbel_draw(logits, temps, keys, noise, ks, ps, scratch).tolist()
    alone = [gumbel_draw(logits[j:j + 1], temps[j:j + 1], keys[j:j + 1], [0], ks[j:j + 1], ps[j:j + 1],
                         scratch).item() for j in range(6)]
    assert both == alone
    best = logits.argmax(-1).tolist()
    assert both[0] == best[0] and both[1] == best[1]
    assert both[2] in logits[2].topk(3).indices.tolist() and both[4] in logits[4].topk(3).indices.tolist()
    assert both[3] == kernels.sample(logits[3:4].contiguous(), 1.0, 8).item()
    # the second choice of a top-k request: alone, and beside a nucleus row that widens the launch to V columns
    two = gumbel_draw(logits[2:4], [1.2, 1.2], [7, 7], [0, 1], [30, 30], [1.0, 1.0], scratch).tolist()
    wide = gumbel_draw(logits[1:4], [0.8, 1.2, 1.2], [6, 7, 7], [0, 0, 1], [0, 30, 30], [0.9, 1.0, 1.0], scratch)
    assert wide.tolist()[1:] == two
    draws = {gumbel_draw(logits[2:3], [1.2], [k], [0], [3], [1.0], scratch).item() for k in range(40)}
    assert draws == set(logits[2].topk(3).indices.tolist())  # all three candidates come up, nothing else
    assert not scratch.any()
