"""picochat doctor: pure decision helpers, probes with faked hardware, and the real CLI on this (CPU) box."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from picochat.tools import doctor

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cap,arch,expected", [
    ((12, 0), ["sm_80", "sm_86", "sm_90"], False),           # consumer Blackwell on a torch without sm_120
    ((12, 0), ["sm_80", "sm_90", "sm_100", "sm_120"], True),
    ((12, 0), ["sm_80", "sm_90", "compute_90"], True),       # PTX JIT covers newer GPUs
    ((8, 9), ["sm_80", "sm_86"], True),                       # same-major cubin compatibility
    ((8, 0), ["sm_86"], False),                               # ... but never downwards
    ((9, 0), ["sm_90a"], True),
    ((10, 0), ["sm_90a"], False),                             # arch-specific targets run only on that GPU
    ((9, 0), [], None),
])
def test_arch_supported(cap, arch, expected):
    assert doctor.arch_supported(cap, arch) is expected


def test_torch_path_warning():
    site = ["/venv/lib/python3.11/site-packages"]
    assert doctor.torch_path_warning("/venv/lib/python3.11/site-packages/torch", env={}, site_dirs=site) is None
    w = doctor.torch_path_warning("/home/me/pytorch/torch", env={}, site_dirs=site)
    assert w and "/home/me/pytorch/torch" in w and "PICOCHAT_EXPECT_TORCH_PATH" in w
    # custom build declared and used: fine; declared but another torch imported: warn and name the variable
    assert doctor.torch_path_warning("/home/me/pytorch/torch", env={"TORCH_LOCAL_PATH": "/home/me/pytorch"},
                                     site_dirs=site) is None
    w = doctor.torch_path_warning("/venv/lib/python3.11/site-packages/torch",
                                  env={"PICOCHAT_EXPECT_TORCH_PATH": "/home/me/pytorch"}, site_dirs=site)
    assert w and "PICOCHAT_EXPECT_TORCH_PATH" in w and "/home/me/pytorch" in w
    # a sibling directory sharing a prefix is not "under" the expected path
    assert doctor.torch_path_warning("/home/me/pytorch2/torch", env={"TORCH_LOCAL_PATH": "/home/me/pytorch"},
                                     site_dirs=site)


def _fake_torch(name, cap, mem_gb, arch_list, n=1, kernel_ok=True):
    props = SimpleNamespace(name=name, major=cap[0], minor=cap[1], total_memory=int(mem_gb * 2**30),
                            multi_processor_count=170)

    def ones(*a, **k):
        if not kernel_ok:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        import torch

        return torch.ones(*a)

    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: n, get_device_properties=lambda i: props)
    return SimpleNamespace(cuda=cuda, ones=ones)


def test_gpu_probe_warns_for_sm120_without_kernels():
    fake = _fake_torch("NVIDIA GeForce RTX 5090", (12, 0), 32, ["sm_80", "sm_86", "sm_90"], kernel_ok=False)
    gpus, warnings = doctor._gpus(fake, ["sm_80", "sm_86", "sm_90"])
    assert gpus[0]["sm"] == "sm_120" and gpus[0]["torch_has_kernels"] is False and gpus[0]["fp8"]
    assert gpus[0]["kernel_test"] == "failed"
    assert any("sm_120" in w and "TORCH_CUDA_ARCH_LIST=12.0" in w for w in warnings)
    assert any("no kernel image" in w for w in warnings)
    gpus, warnings = doctor._gpus(_fake_torch("NVIDIA H100 80GB HBM3", (9, 0), 79.2, ["sm_90"], n=8), ["sm_90"])
    assert len(gpus) == 8 and warnings == [] and gpus[0]["kernel_test"] == "ok"


def test_recommendations_for_gpu_nodes():
    def gpu(cap, mem, n):
        return [{"memory_gb": mem, "capability": f"{cap[0]}.{cap[1]}", "bf16": cap >= (8, 0)}] * n

    disk = {"free_gb": 500}
    r = doctor._recommend(gpu((9, 0), 79.2, 8), "sdpa-cudnn", disk, {"available": True}, 128)
    assert r["preset"] == "d20" and r["nproc_per_node"] == 8 and r["fp8"] is True
    # with fp8 (the default here) d20 x 32 fits: 58.5 GB measured on an H200; bf16 x 32 ran out of memory
    assert r["window_pattern"] == "L" and r["device_batch_size"]["d20"] == 32
    assert r["device_batch_size"]["d24"] == 16 and r["device_batch_size"]["d32"] == 8
    assert any("--nproc-per-node 8" in n for n in r["notes"])
    r = doctor._recommend(gpu((12, 0), 31.4, 1), "sdpa-cudnn", {"free_gb": 10}, {"available": False}, 16)
    assert r["preset"] == "d12" and r["fp8"] is True  # d12 on Blackwell: fp8 for the MLP (fp8.scope)
    r = doctor._recommend(gpu((8, 9), 23.6, 1), "sdpa-cudnn", disk, {"available": True}, 16)
    assert r["preset"] == "d12" and r["fp8"] is False and r["fp8_supported"] is True  # Ada: not measured, opt-in
    r = doctor._recommend(gpu((12, 0), 31.4, 1), "sdpa-cudnn", {"free_gb": 10}, {"available": False}, 16)
    assert any("libuv" in n for n in r["notes"]) and any("GB free" in n for n in r["notes"])
    r = doctor._recommend([], "sdpa", disk, {"available": True}, 2)
    assert r["preset"] == "tiny" and r["nproc_per_node"] == 1


def test_libuv_probe_reports_a_libuv_less_build(monkeypatch):
    import torch.distributed as dist

    real = dist.TCPStore

    class NoLibuv(real):
        def __init__(self, *args, use_libuv=True, **kwargs):
            if use_libuv:
                raise RuntimeError("use_libuv was requested but PyTorch was build without libuv support, "
                                   "run with USE_LIBUV=0 to disable it.")
            super().__init__(*args, use_libuv=False, **kwargs)

    assert doctor.probe_libuv()["available"] in (True, False)
    monkeypatch.setattr(dist, "TCPStore", NoLibuv)
    p = doctor.probe_libuv()
    assert p["available"] is False and "without libuv" in p["error"]


def test_doctor_cli_json_on_cpu(capsys):
    from picochat.cli import main

    assert main(["doctor", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["versions"]["torch"] and Path(r["versions"]["torch_path"]).is_dir()
    assert r["attention_backend"] and r["distributed"]["gloo"] is True
    assert r["disk"]["free_gb"] > 0 and r["recommendations"]["preset"]
    assert "libuv" in r["distributed"]


def test_doctor_text_report_mentions_everything():
    text = doctor.format_report(doctor.run())
    for word in ("torch", "attention", "libuv", "disk", "recommendations", "--nproc-per-node"):
        assert word in text


def test_doctor_names_the_sandbox_and_warns_when_the_python_tool_is_off(monkeypatch):
    from picochat import sandbox

    report = doctor.run()
    assert report["sandbox"]["kind"] in ("bwrap", "trusted", "none")
    assert f"sandbox   {report['sandbox']['kind']}" in doctor.format_report(report)
    monkeypatch.delenv(sandbox.SANDBOX_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_probed", lambda refresh=False: {"available": False, "reason": "bwrap not found"})
    off = doctor.run()
    assert off["sandbox"]["kind"] == "none"
    assert any("python tool and HumanEval are off: bwrap not found" in w for w in off["warnings"])


# ----------------------------------------------------------------------------------------------------------------
# Checks that block training, with faked probes


def test_driver_older_than_torch_cuda_blocks_and_names_the_fix():
    problems, warnings = doctor.cuda_findings("12.8", (11, 8), 1, False)
    assert len(problems) == 1 and "CUDA up to 11.8" in problems[0] and "12.8" in problems[0]
    assert "update the driver" in problems[0] and "whl/cu118" in problems[0]
    problems, warnings = doctor.cuda_findings("12.8", (12, 4), 1, True)  # minor-version compatibility: runs
    assert problems == [] and len(warnings) == 1 and "12.4" in warnings[0]
    assert doctor.cuda_findings("12.8", (13, 0), 8, True) == ([], [])
    assert doctor.cuda_findings(None, None, 0, False) == ([], [])  # a CPU box


def test_gpus_torch_cannot_use_are_a_problem():
    problems, _ = doctor.cuda_findings(None, (12, 8), 2, False)  # CPU-only torch on a GPU machine
    assert len(problems) == 1 and "CPU-only build" in problems[0] and "download.pytorch.org" in problems[0]
    problems, _ = doctor.cuda_findings("12.8", (12, 8), 2, False)
    assert len(problems) == 1 and "--gpus all" in problems[0]
    # hidden on purpose: not a problem
    assert doctor.cuda_findings("12.8", (12, 8), 2, False, visible="") == ([], [])


def test_triton_needs_a_c_compiler_and_python_headers_on_cuda():
    assert doctor.compiler_findings(True, "3.5.0", True, "/usr/bin/cc", True) == []
    assert doctor.compiler_findings(False, None, True, None, False) == []   # no CUDA: nothing compiles
    assert doctor.compiler_findings(True, "3.5.0", False, None, False) == []  # PICOCHAT_COMPILE=0
    p = doctor.compiler_findings(True, "3.5.0", True, None, True)
    assert len(p) == 1 and "C compiler" in p[0] and "build-essential" in p[0]
    p = doctor.compiler_findings(True, "3.5.0", True, "/usr/bin/gcc", False)
    assert len(p) == 1 and "Python.h" in p[0] and "-dev" in p[0]
    p = doctor.compiler_findings(True, None, True, "/usr/bin/gcc", True)
    assert len(p) == 1 and "pip install triton" in p[0]


def test_small_dev_shm_warns_only_with_several_gpus():
    assert doctor.shm_warning(8, 64 * 2**20) and "--shm-size" in doctor.shm_warning(8, 64 * 2**20)
    assert doctor.shm_warning(1, 64 * 2**20) is None
    assert doctor.shm_warning(8, 16 * 2**30) is None
    assert doctor.shm_warning(8, None) is None


def test_probe_cc_honours_CC(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    assert doctor.probe_cc() is None
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC")
    assert doctor.probe_cc() is None
    cc = tmp_path / "gcc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    assert doctor.probe_cc() == str(cc)


def test_mps_recommends_tiny_and_says_untested():
    r = doctor._recommend([], "sdpa", {"free_gb": 100}, {"available": True}, 10, mps=True)
    assert r["preset"] == "tiny" and r["device"] == "mps"
    assert any("untested" in n and "PICOCHAT_DEVICE=cpu" in n for n in r["notes"])


def test_blocking_findings_make_the_cli_exit_nonzero(monkeypatch, capsys):
    from picochat.cli import main

    monkeypatch.setattr(doctor, "probe_smi_gpus", lambda: 4)
    monkeypatch.setattr(doctor, "probe_driver_cuda", lambda: (12, 8))
    assert main(["doctor"]) == 1  # nvidia-smi sees GPUs, this (CPU) torch does not
    out = capsys.readouterr().out
    assert "problems: training cannot run here" in out and "nvidia-smi lists 4 GPU(s)" in out
    # --bench does not try to train on a machine that cannot
    assert main(["doctor", "--bench", "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    assert r["problems"] and "skipped" in r["bench"]


def test_doctor_rejects_bad_flags():
    from picochat.config import UserError

    with pytest.raises(UserError, match="--price"):
        doctor.cli_main(SimpleNamespace(json=False, bench=True, bench_steps=0, price=-1.0))
    with pytest.raises(UserError, match="--bench-steps"):
        doctor.cli_main(SimpleNamespace(json=False, bench=True, bench_steps=-3, price=None))


# ----------------------------------------------------------------------------------------------------------------
# --bench


def test_bench_on_cpu_measures_and_predicts_every_preset(capsys):
    from picochat.cli import main
    from picochat.tools import speedrun

    assert main(["doctor", "--bench", "--bench-steps", "1", "--json", "--price", "0.5"]) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)  # the bench's progress lines went to stderr
    assert "[doctor] timing 1 training steps of the tiny preset's model here" in cap.err  # said before the wait
    b = r["bench"]
    m = b["measured"]
    assert m["depth"] == 4 and m["device"] == "cpu" and m["tok_per_s"] > 0 and b["allreduce"] is None
    preds = {p["preset"]: p for p in b["predictions"]}
    assert list(preds) == list(speedrun.PRESETS)
    # the tiny pipeline: the bench's own FLOP/s over the tiny pretrain's tokens, plus the measured rest
    tiny = preds["tiny"]
    assert tiny["pretrain_tokens"] == 450 * 4096 and tiny["rest_measured"]
    expect = tiny["pretrain_tokens"] * tiny["flops_per_token"] / (m["tok_per_s"] * m["flops_per_token"])
    assert tiny["pretrain_seconds"] == pytest.approx(expect, rel=1e-9)
    assert tiny["total_seconds"] > tiny["pretrain_seconds"]
    assert tiny["cost"] == pytest.approx(tiny["total_seconds"] / 3600 * 0.5)
    secs = [preds[p]["total_seconds"] for p in ("tiny", "d12", "d20", "d24", "d32")]
    assert secs == sorted(secs)
    text = doctor.format_bench(b)
    assert "tok/s" in text and "d32" in text and "assumed" in text and "measured" in text


def test_predictions_with_gpus_scale_by_mfu_and_add_communication():
    bench = {"tok_per_s": 500_000, "flops_per_token": 1.5e9, "depth": 12}
    one = {p["preset"]: p for p in doctor.predict(bench, 1, 2.5)}
    ar = {"bytes_per_s": 100e9}
    eight = {p["preset"]: p for p in doctor.predict(bench, 8, 2.5, ar, {"d32": 0})}
    d20_1, d20_8 = one["d20"], eight["d20"]
    assert d20_8["communication_seconds"] > 0 and one["d20"]["communication_seconds"] == 0
    # 8 GPUs: ~8x less compute, the same GPU-hours but for communication
    assert d20_8["pretrain_seconds"] - d20_8["communication_seconds"] == pytest.approx(
        d20_1["pretrain_seconds"] * d20_1["flops_per_token"] / d20_8["flops_per_token"] / 8 *
        d20_8["pretrain_tokens"] / d20_1["pretrain_tokens"], rel=1e-6)
    assert d20_8["cost"] == pytest.approx(d20_8["total_seconds"] / 3600 * 8 * 2.5)
    assert eight["d32"]["fits"] is False and eight["d20"]["fits"] is True
    assert "unavailable" in eight["tiny"] and "tiny" in doctor.format_bench(
        {"measured": {**bench, "gpu": "H100", "device": "cuda:0", "steps": 3, "total_batch_size": 65536, "mfu": 0.5},
         "allreduce": None, "price": 2.5, "price_unit": "GPU-hour", "predictions": list(eight.values())})


def test_allreduce_is_measured_across_real_processes():
    a = doctor.measure_allreduce(2, nbytes=1 << 16, backend="gloo", iters=2, timeout_s=120)
    assert a["ranks"] == 2 and a["seconds"] > 0 and a["bytes_per_s"] > 0
