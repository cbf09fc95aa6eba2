"""fp16 with dynamic loss scaling: the dtype choice per GPU generation, the scaler's policy, unscaled gradients equal
to an unscaled run's (with an overflow injected), fp16 pretraining that resumes exactly, and MPS-safe helpers. GPU
tests skip without a GPU."""

import copy
import math
import os
from pathlib import Path

import pytest
import torch

from picochat import runtime, training
from picochat.config import ConfigError, UserError
from picochat.model import GPTConfig, build_model
from picochat import scaling
from picochat.optim import build_optimizer as _build_optimizer
from picochat.stages.pretrain import PretrainConfig, run, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_dtype_follows_the_gpu_generation(monkeypatch):
    assert runtime.default_dtype("cuda", (9, 0)) == torch.bfloat16   # H100
    assert runtime.default_dtype("cuda", (8, 0)) == torch.bfloat16   # A100
    assert runtime.default_dtype("cuda", (7, 5)) == torch.float16    # T4: no bf16
    assert runtime.default_dtype("cuda", (7, 0)) == torch.float16    # V100
    assert runtime.default_dtype("cuda", (6, 1)) == torch.float32    # no tensor cores
    assert runtime.default_dtype("cpu") == runtime.default_dtype("mps") == torch.float32
    monkeypatch.setenv("PICOCHAT_DTYPE", "fp16")
    assert runtime.compute_dtype(torch.device("cpu")) == torch.float16
    assert runtime.compute_dtype(torch.device("cpu"), "float32") == torch.float32  # --dtype wins over the env
    monkeypatch.setenv("PICOCHAT_DTYPE", "half")
    with pytest.raises(ConfigError, match="PICOCHAT_DTYPE=half: unknown dtype"):
        runtime.compute_dtype(torch.device("cpu"))


def test_scaler_only_for_fp16():
    assert training.loss_scaler(torch.float16) is not None
    assert training.loss_scaler(torch.bfloat16) is None and training.loss_scaler(torch.float32) is None


def test_scaler_policy_backoff_growth_and_giving_up():
    s = training.LossScaler(scale=1024.0, growth_interval=3, max_skips_in_row=2)
    s.update(False)
    s.update(False)
    assert s.scale == 1024.0 and s.good_steps == 2
    s.update(True)  # overflow: halved, and the good-step count starts again
    assert s.scale == 512.0 and s.good_steps == 0 and s.skipped == 1
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024.0 and s.good_steps == 0  # grown after 3 good steps in a row
    s.update(True)
    s.update(True)
    with pytest.raises(UserError, match="inf/NaN for 3 steps in a row.*--dtype float32"):
        s.update(True)
    t = training.LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_unscale_finds_inf_and_nan_and_divides_exactly():
    s = training.LossScaler(scale=8.0)
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([8.0, 16.0, -24.0])
    b.grad = torch.full((2, 2), 4.0)
    assert s.unscale_([a, b]) is False
    assert torch.equal(a.grad, torch.tensor([1.0, 2.0, -3.0])) and torch.equal(b.grad, torch.full((2, 2), 0.5))
    for bad in (math.inf, -math.inf, math.nan):
        b.grad = torch.tensor([[1.0, bad], [0.0, 0.0]])
        assert s.unscale_([a, b]) is True


def build_optimizer(model):
    return _build_optimizer(model, matrix_lr=scaling.MATRIX_LR, embedding_lr=scaling.EMBEDDING_LR,
                            value_embed_lr=scaling.VALUE_EMBED_LR, unembedding_lr=scaling.UNEMBEDDING_LR,
                            resid_lr=scaling.RESID_LR, x0_lr=scaling.X0_LR)


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32),
                       device="cpu")


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        rows = torch.randint(0, 64, (2, 33), generator=g)
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def test_scaled_fp32_run_matches_the_unscaled_one_with_an_overflow_skipped(capsys):
    """In fp32 the scaler must be invisible: the same gradients after unscaling and the same weights, except that
    the step with an injected inf is skipped (the reference run skips it too), with the scale halved there and
    grown back after `growth_interval` good steps."""
    plain = _tiny_model()
    scaled = copy.deepcopy(plain)
    opt_a, opt_b = build_optimizer(plain), build_optimizer(scaled)
    scaler = training.LossScaler(scale=2.0 ** 12, growth_interval=2)
    poisoned, scales = 2, []
    for i, (x, y) in enumerate(_batches(6)):
        plain(x, y).backward()
        scaler.backward(scaled(x, y))
        if i == poisoned:
            scaled.lm_head.weight.grad[0, 0] = math.inf
        else:
            grads_a = [p.grad.clone() for p in plain.parameters()]
        stepped = scaler.step(opt_b)
        assert stepped == (i != poisoned)
        if stepped:
            for ga, p in zip(grads_a, scaled.parameters()):
                torch.testing.assert_close(p.grad, ga, rtol=1e-6, atol=1e-9)
            opt_a.step()
        plain.zero_grad(set_to_none=True)
        scaled.zero_grad(set_to_none=True)
        scales.append(scaler.scale)
    assert scales == [2.0 ** 12, 2.0 ** 13, 2.0 ** 12, 2.0 ** 12, 2.0 ** 13, 2.0 ** 13]
    for pa, pb in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-7)
    assert "step skipped, loss scale 8192 -> 4096" in capsys.readouterr().out


def test_train_step_with_a_scaler_never_arms_the_optimizer():
    """Armed, the optimizer's hooks would reduce the scaled gradients across ranks before the overflow check."""
    model = _tiny_model()
    opt = build_optimizer(model)
    armed = []
    real_arm = opt.arm
    opt.arm = lambda last=True: (armed.append(last), real_arm(last))
    batches = iter(_batches(6))
    train_step(model, opt, next(batches), lambda: next(batches), 2, training.LossScaler())
    assert armed == [False, False]
    train_step(model, opt, next(batches), lambda: next(batches), 1, None)
    assert armed[-1] is True


def _cfg(run_name, **kw):
    base = dict(data="random", vocab_size=128, depth=2, aspect_ratio=32, head_dim=16, seq_len=32, device_batch_size=2,
                total_batch_size=128, lr_scale=1.0, warmup_steps=2, weight_decay=0.05, eval_tokens=256,
                sample_every=-1, run=run_name, num_iterations=6, eval_every=0, save_every=3, dtype="float16")
    base.update(kw)
    return PretrainConfig(**base)


def _records(run_name):
    return training.read_metrics(Path(os.environ["PICOCHAT_HOME"]) / "runs" / run_name / "base" / "metrics.jsonl")


def test_fp16_pretraining_scales_and_resumes_exactly(monkeypatch):
    """fp16 (here on CPU) trains with the scaler, logs its scale, and a resumed run continues bit-exactly, the
    scaler's state included (a growth interval of 2 makes the scale change across the checkpoint)."""
    monkeypatch.setattr(training.LossScaler.__init__, "__defaults__", (2.0 ** 16, 2.0, 0.5, 2, 50))
    full = run(_cfg("f16_full"))
    assert full["step"] == 6 and math.isfinite(full["train_loss"]) and full["fp16_skipped_steps"] == 0
    scales = [r["loss_scale"] for r in _records("f16_full") if "loss_scale" in r]
    assert scales == [2.0 ** 16, 2.0 ** 17, 2.0 ** 17, 2.0 ** 18, 2.0 ** 18, 2.0 ** 19]
    run(_cfg("f16_part", stop_at_step=3, save_every=0))
    rest = run(_cfg("f16_part", save_every=0))
    assert rest["steps_this_run"] == 3 and rest["loss_scale"] == full["loss_scale"]
    loss = lambda name: {r["step"]: r["loss"] for r in _records(name) if "loss" in r}  # noqa: E731
    assert loss("f16_full") == loss("f16_part")


def test_fp32_pretraining_has_no_scaler():
    out = run(_cfg("f32", dtype="float32", num_iterations=2))
    assert "loss_scale" not in out and not any("loss_scale" in r for r in _records("f32"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_gpu_trains_like_bf16():
    """The same steps on the GPU in fp16 (scaled) and bf16: both finite, the losses close."""
    kw = dict(device="cuda", num_iterations=20, save_every=0, compile=False)
    a = run(_cfg("gpu16", **kw))
    b = run(_cfg("gpu_bf16", **{**kw, "dtype": "bfloat16"}))
    assert a["fp16_skipped_steps"] <= 2 and "loss_scale" not in b
    assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * b["train_loss"]


def test_mps_sums_avoid_float64_and_a_missing_mps_is_one_line():
    """MPS has no float64: evaluation sums (bpb, chat val loss, CORE, pass@k) use float32 there only."""
    assert runtime.accum_dtype("mps") == torch.float32
    assert runtime.accum_dtype("cpu") == runtime.accum_dtype(torch.device("cpu")) == torch.float64
    if not (torch.backends.mps.is_available()):
        with pytest.raises(ConfigError, match="--device mps: Apple MPS is not available here; use --device cpu"):
            runtime.detect_device("mps")
