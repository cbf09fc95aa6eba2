"""The depth dial: pure functions, checked against nanochat's published per-depth table and by invariants."""

import math

import pytest

from picochat import scaling


@pytest.mark.parametrize("depth,d_model,heads,batch,steps,wd", [
    (6, 384, 3, 262144, 1062, 0.94), (12, 768, 6, 524288, 2520, 0.28), (20, 1280, 10, 1048576, 4980, 0.10),
    (24, 1536, 12, 1048576, 8352, 0.060), (32, 2048, 16, 2097152, 9600, 0.037)])
def test_derive_matches_nanochat_table(depth, d_model, heads, batch, steps, wd):
    """nanochat scripts/base_train.py (HEAD defaults: vocab 32768, T 2048, ratio 12)."""
    d = scaling.derive(depth)
    assert (d["n_embd"], d["n_head"], d["total_batch_size"], d["num_iterations"]) == (d_model, heads, batch, steps)
    assert d["muon_weight_decay"] == pytest.approx(wd, rel=0.03)
    assert d["lr_scale"] == pytest.approx(math.sqrt(max(batch, 2**19) / 2**19))


def test_lr_scale_grows_with_batch_and_is_floored_at_the_reference():
    assert scaling.lr_scale(2**21) == pytest.approx(2.0)
    assert scaling.lr_scale(2**19) == 1.0
    assert scaling.lr_scale(2**17) == 1.0  # measured: scaling down below 2^19 hurt (scaling.lr_scale)
    # weight decay keeps the sqrt rule on both sides (T_epoch)
    assert scaling.muon_weight_decay(2**17, 1.0, 1.0) == pytest.approx(scaling.MUON_WD_REF * 0.5)


def test_known_parameter_counts():
    assert scaling.scaling_params(12) == 110_100_480
    assert scaling.derive(12)["params_total"] == 286_261_704
    assert scaling.derive(20)["params_scaling"] == 435_159_040


def test_width_rounding_and_head_dim_override():
    assert scaling.model_dims(4) == (4, 256, 2)
    assert scaling.model_dims(4, head_dim=64) == (4, 256, 4)
    assert scaling.model_dims(3, head_dim=64) == (3, 192, 3)
    assert scaling.model_dims(13) == (13, 896, 7)  # 832 rounded up to a multiple of 128
    with pytest.raises(ValueError):
        scaling.model_dims(0)


def test_overrides_and_batch_rule():
    d = scaling.derive(12, total_batch_size=262144, num_iterations=150)
    assert d["total_batch_size"] == 262144 and d["num_iterations"] == 150 and d["tokens"] == 150 * 262144
    assert d["muon_weight_decay"] == pytest.approx(0.28 * math.sqrt(0.5))  # horizon = target tokens
    assert scaling.batch_size_tokens(1.0, 1.0) == 2**19
    assert scaling.batch_size_tokens(2 ** (1 / 0.383), 1.0) == 2**20  # doubling after D grows 2^(1/0.383)


def test_lr_schedule():
    f = lambda s: scaling.lr_multiplier(s, 1000, warmup=40, warmdown_frac=0.65, final_frac=0.05)  # noqa: E731
    assert f(0) == pytest.approx(1 / 40) and f(39) == 1.0 and f(100) == 1.0 and f(349) == 1.0
    assert f(999) == pytest.approx(0.05)
    vals = [f(s) for s in range(350, 1000)]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and vals[0] < 1.0
    assert scaling.lr_multiplier(5, 10, warmup=0, warmdown_frac=0.0) == 1.0


def test_momentum_and_wd_schedules():
    m = lambda s: scaling.muon_momentum(s, 10000)  # noqa: E731
    assert m(0) == pytest.approx(0.85) and m(200) == pytest.approx(0.91) and m(400) == pytest.approx(0.97)
    assert m(3000) == pytest.approx(0.97) and m(9999) == pytest.approx(0.90)
    w = lambda s: scaling.weight_decay_multiplier(s, 101)  # noqa: E731
    assert w(0) == 1.0 and w(50) == pytest.approx(0.5) and w(100) == pytest.approx(0.0, abs=1e-12)
    assert all(w(s) >= w(s + 1) for s in range(100))


def test_device_batch_defaults():
    assert scaling.device_batch_size(12) == 32 and scaling.device_batch_size(20) == 16
    assert scaling.device_batch_size(24) == 16 and scaling.device_batch_size(32) == 8
    assert scaling.device_batch_size(20, sequence_len=1024) == 32
    # fp8 keeps fp8 copies of the matmul inputs: twice the rows up to d20, unchanged beyond (not measured)
    assert scaling.device_batch_size(12, fp8=True) == 64 and scaling.device_batch_size(20, fp8=True) == 32
    assert scaling.device_batch_size(24, fp8=True) == 16 and scaling.device_batch_size(32, fp8=True) == 8


def test_batch_recommendation_matches_known_fits_and_is_monotonic():
    h100 = 80 * 2**30
    # published nanochat runs on 8x80GB: d20 batch 32, d24 16, d32 8
    assert scaling.recommend_batch(h100, 20, world_size=8) == 16  # d20 x 32 ran out of memory on an H100
    assert scaling.recommend_batch(h100, 24, world_size=8) == 16
    assert scaling.recommend_batch(h100, 32, world_size=8) == 8
    for depth in (12, 20, 24, 32):
        bs = [scaling.recommend_batch(gb * 2**30, depth) for gb in (8, 16, 24, 48, 80, 141)]
        assert bs == sorted(bs)
    assert scaling.recommend_batch(4 * 2**30, 32) == 0
    assert scaling.estimate_memory(20, 16) < scaling.estimate_memory(20, 32) < scaling.estimate_memory(24, 32)
    # fp8 (measured on an H200: d12 x 64 44.4 GB, d20 x 32 58.5 GB) fits twice the rows of bf16 on an 80 GB GPU,
    # and the estimate stays above what was measured
    assert scaling.recommend_batch(h100, 12, fp8=True) == 64 and scaling.recommend_batch(h100, 20, fp8=True) == 32
    assert scaling.recommend_batch(h100, 24, fp8=True) == 16
    for depth, rows, measured_gb in ((12, 32, 24.8), (12, 64, 44.4), (20, 16, 35.8), (20, 32, 58.5)):
        assert measured_gb * 1e9 < scaling.estimate_memory(depth, rows, fp8=True) < 1.3 * measured_gb * 1e9
