"""fp8 block matmuls: close to the full-precision result, same parameters and checkpoints, clear refusal on CPU."""

import pytest
import torch

from picochat.ops import fp8
from picochat.config import UserError
from picochat.model import GPTConfig, Linear, build_model

CFG = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_quantize_round_trip_and_scale():
    x = torch.randn(64, 32) * 3
    q, s = fp8.quantize(x, fp8.E4M3, fp8.E4M3_MAX)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert q.float().abs().max().item() == pytest.approx(448.0)  # the amax maps onto the format's max
    assert _rel(q.float() * s, x) < 0.05  # e4m3 keeps 3 mantissa bits: ~2-3% relative error
    z, sz = fp8.quantize(torch.zeros(16, 16), fp8.E5M2, fp8.E5M2_MAX)
    assert torch.isfinite(sz) and (z.float() == 0).all()


def test_fp8_matmul_forward_and_grads_track_fp32():
    torch.manual_seed(0)
    x = torch.randn(128, 64, requires_grad=True)
    w = (torch.randn(96, 64) * 0.1).requires_grad_()
    dy = torch.randn(128, 96)
    y = fp8._Fp8Matmul.apply(x, w)
    y.backward(dy)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = x @ w.t()
    ref.backward(dy)
    assert y.shape == ref.shape and w.grad.dtype == torch.float32
    assert _rel(y, ref) < 0.08
    assert _rel(gx, x.grad) < 0.15  # e5m2 gradients: 2 mantissa bits
    assert _rel(gw, w.grad) < 0.15


def test_convert_swaps_block_projections_only_and_keeps_state_dict():
    torch.manual_seed(0)
    m = build_model(CFG)
    keys = list(m.state_dict())
    with torch.no_grad():
        for b in m.blocks:
            b.attn.c_proj.weight.normal_(0, 0.05)
            b.mlp.c_proj.weight.normal_(0, 0.05)
        m.lm_head.weight.normal_(0, 0.05)
    idx = torch.randint(0, 256, (2, 64))
    ref = m(idx, idx)
    assert fp8.convert(m) == 6 * CFG.n_layer + 1  # + the lm_head's logits in the fused loss
    assert type(m.lm_head) is Linear and isinstance(m.blocks[0].mlp.c_fc, fp8.Float8Linear)
    assert m.logits_quantizer is fp8.quantize_logits and build_model(CFG).logits_quantizer is None
    mlp_only = build_model(CFG)
    assert fp8.convert(mlp_only, "mlp") == 2 * CFG.n_layer + 1
    assert type(mlp_only.blocks[0].attn.c_q) is Linear and isinstance(mlp_only.blocks[0].mlp.c_proj,
                                                                          fp8.Float8Linear)
    with pytest.raises(ValueError, match="scope"):
        fp8.convert(mlp_only, "attention")
    assert list(m.state_dict()) == keys  # checkpoints look the same with or without fp8
    loss = m(idx, idx)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.blocks.parameters())
    with torch.no_grad():  # one-token decoding (rows not a multiple of 16) takes the plain path
        assert m(idx[:1, :5]).shape == (1, 5, CFG.vocab_size)


def test_fp8_logits_in_the_fused_loss_track_bf16_and_leave_eval_logits_alone():
    """`loss.fused_linear_cross_entropy(quantize=fp8.quantize_logits)`: the logits come from an e4m3 GEMM, the
    gradients do not; a chunk whose rows are not a multiple of 16 takes the plain matmul."""
    from picochat.ops.loss import fused_linear_cross_entropy

    torch.manual_seed(0)
    V, d = 256, 64
    w = (torch.randn(V + 64, d) * 0.2).requires_grad_()  # padded vocab rows, as the model has
    for n in (96, 100):  # 100 rows in chunks of 32: the last chunk of 4 rows is not fp8-eligible
        x = torch.randn(n, d, requires_grad=True)
        t = torch.randint(0, V, (n,))
        out = {}
        for on in (False, True):
            x.grad = w.grad = None
            loss = fused_linear_cross_entropy(x, w, t, V, softcap=15.0, chunk=32,
                                              quantize=fp8.quantize_logits if on else None)
            loss.backward()
            out[on] = (loss.item(), x.grad.clone(), w.grad.clone())
        assert out[True][0] != out[False][0]  # fp8 logits really were used
        assert abs(out[True][0] - out[False][0]) < 0.01 * out[False][0]
        assert _rel(out[True][1], out[False][1]) < 0.1 and _rel(out[True][2], out[False][2]) < 0.1
        assert (w.grad[V:] == 0).all()
    m = build_model(CFG)
    idx = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        m.lm_head.weight.normal_(0, 0.05)
        ref, ref1 = m(idx), m(idx[:, :1])
        fp8.convert(m)
        assert torch.equal(m(idx[:, :1]), ref1)  # decoding a token: the plain bf16/fp32 path
        assert _rel(m(idx), ref) < 0.1  # eval logits: the blocks are fp8, the lm_head call itself is not


def test_fp8_refused_without_fp8_tensor_cores():
    from picochat.training import apply_fp8

    ok, why = fp8.supported(torch.device("cpu"))
    assert not ok and "fp8" in why
    with pytest.raises(UserError, match="--fp8"):
        apply_fp8(build_model(CFG), True, torch.device("cpu"))
    assert apply_fp8(build_model(CFG), False, torch.device("cpu")) == 0


def test_fp8_default_is_on_only_where_it_was_measured_to_pay():
    """`fp8.resolve`: explicit flags win; the default needs a compiled model on an fp8 GPU and d12+ on
    Hopper/Blackwell; `fp8.scope`: the MLP only below d20 (all six was slower at d12), all six from d20."""
    cpu = torch.device("cpu")
    assert fp8.resolve(None, 20, cpu, compiled=True) is False
    assert fp8.resolve(True, 12, cpu, compiled=False) is True and fp8.resolve(False, 32, cpu, True) is False
    assert fp8.pays_off((9, 0), 20) and fp8.pays_off((12, 0), 26) and fp8.pays_off((10, 0), 12)
    assert not fp8.pays_off((9, 0), 10) and not fp8.pays_off((8, 9), 20) and not fp8.pays_off((8, 0), 32)
    assert [fp8.scope(d) for d in (4, 12, 19, 20, 32)] == ["mlp", "mlp", "mlp", "all", "all"]
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        want = fp8.supported(dev)[0] and fp8.pays_off(torch.cuda.get_device_capability(dev), 20)
        assert fp8.resolve(None, 20, dev, compiled=True) is want
        assert fp8.resolve(None, 20, dev, compiled=False) is False
