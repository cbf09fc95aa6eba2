"""`picochat export`: the folder is self-contained (weights, tokenizer, config), loads like a checkpoint with the same
logits, and is written atomically."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from picochat import checkpoint
from picochat.config import UserError
from picochat.serving.export import ExportConfig, run
from picochat.model import GPTConfig, build_model
from tests.test_model import _live

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module, Path]:
    """A small sft-stage checkpoint with non-trivial weights and a real tokenizer of its own."""
    from picochat.config import to_dict
    from picochat.tokenizer import Tokenizer

    tok = Tokenizer.train(["the quick brown fox jumps over the lazy dog. " * 40, "hello there, how are you?" * 40],
                          vocab_size=300)
    tdir = tmp_path / "tok"
    tok.save(tdir)
    cfg = GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                    smear=True, backout=True)
    torch.manual_seed(0)
    model = _live(build_model(cfg)).eval()
    meta = {"stage": "sft", "run": "r", "model_config": to_dict(cfg), "tokenizer_dir": str(tdir),
            "metrics": {"val_bpb": 1.25, "chat_acc": 0.5}, "config": {"data": str(tmp_path / "shards")},
            "env": {"hostname": "alice-laptop", "torch": torch.__version__}}
    ck = checkpoint.save_checkpoint(checkpoint.checkpoints_dir("r", "sft"), 7, model.state_dict(), None, meta, None)
    return ck, model, tdir


def test_export_round_trip_gives_identical_logits_and_needs_nothing_else(tmp_path):
    ck, model, tdir = _trained_checkpoint(tmp_path)
    out = tmp_path / "shared" / "my-chat"
    res = run(ExportConfig(out=str(out), dtype="float32"))  # the newest sft run: the one above
    assert res["checkpoint"] == str(ck) and res["step"] == 7 and res["params"] == sum(p.numel() for p in
                                                                                       model.parameters())
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "meta.json", "model.safetensors", "tokenizer"]
    assert not list(out.parent.glob(".my-chat*"))  # no temp folder left behind
    assert [p.name for p in (out / "tokenizer").iterdir()] == ["tokenizer.json"]  # no pickle anywhere
    shutil.rmtree(tdir)  # the training machine's tokenizer is gone: the folder must carry its own
    shutil.rmtree(ck.parent)
    loaded, tok, meta = checkpoint.load_model(out)
    assert meta["stage"] == "sft" and meta["step"] == 7 and meta["format"] == "picochat-export-1"
    assert tok.vocab_size == model.config.vocab_size and tok.decode(tok.encode("hello there")) == "hello there"
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    shared = (out / "meta.json").read_text()  # nothing that points back into the training machine
    assert str(tmp_path) not in shared and "hostname" not in shared
    card = (out / "README.md").read_text()
    assert "picochat chat --checkpoint my-chat" in card and "val_bpb | 1.2500" in card


def test_bf16_export_is_half_the_size_and_rounds_the_weights(tmp_path):
    _, model, _ = _trained_checkpoint(tmp_path)
    f32 = run(ExportConfig(out=str(tmp_path / "f32"), dtype="float32"))
    bf16 = run(ExportConfig(out=str(tmp_path / "bf16")))
    assert bf16["dtype"] == "bfloat16" and bf16["bytes"] < 0.55 * f32["bytes"]
    loaded, _, _ = checkpoint.load_model(tmp_path / "bf16")
    want = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_export_refuses_to_overwrite_and_an_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    _trained_checkpoint(tmp_path)
    out = tmp_path / "m"
    run(ExportConfig(out=str(out)))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--out .*already exists.*--force"):
        run(ExportConfig(out=str(out)))
    with pytest.raises(UserError, match="--out"):
        run(ExportConfig())

    import safetensors.torch

    real = safetensors.torch.save_file

    def disk_full(*a, **kw):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="injected"):
        run(ExportConfig(out=str(out), force=True))
    assert (out / "model.safetensors").read_bytes() == before  # the old export is untouched
    with pytest.raises(OSError, match="injected"):
        run(ExportConfig(out=str(tmp_path / "new")))
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob("*.old*"))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    run(ExportConfig(out=str(out), force=True, dtype="float32"))
    assert json.loads((out / "meta.json").read_text())["dtype"] == "float32"


def test_exported_model_chats_like_its_checkpoint(tmp_path):
    from picochat.engine import load_engine

    ck, _, _ = _trained_checkpoint(tmp_path)
    run(ExportConfig(out=str(tmp_path / "m"), dtype="float32"))
    outs = []
    for where in (str(ck), str(tmp_path / "m")):
        engine, meta = load_engine(checkpoint=where, device="cpu")
        prompt = engine.tokenizer.encode("the quick", prepend=engine.tokenizer.bos_id)
        outs.append([col[0] for col, _ in engine.generate(prompt, num_samples=1, max_tokens=8, temperature=0.0)])
    assert outs[0] == outs[1] and len(outs[0]) >= 3  # greedy: the same tokens (it may stop early at an end token)
