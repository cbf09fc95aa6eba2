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
