"""Checkpoints of a trained model: identical logits after the round trip, load_model, update_meta, atomicity."""

import json

import pytest
import torch

from picochat.checkpoint import (checkpoints_dir, latest_checkpoint, load_model, load_model_state, read_meta,
                                 save_checkpoint, update_meta)
from picochat.config import from_dict
from picochat.model import GPTConfig, build_model
from picochat.stages.pretrain import PretrainConfig, run


pytestmark = pytest.mark.usefixtures("one_thread")



def test_trained_checkpoint_round_trip_gives_identical_logits():
    run(PretrainConfig(data="random", vocab_size=128, depth=2, aspect_ratio=32, head_dim=16, seq_len=32, device_batch_size=2,
                       total_batch_size=64, num_iterations=3, eval_every=0, save_every=0, eval_tokens=128,
                       sample_every=-1, lr_scale=1.0, warmup_steps=1, run="rt"))
    ck = latest_checkpoint(checkpoints_dir("rt", "base"))
    meta = read_meta(ck)
    assert meta["stage"] == "base" and meta["step"] == 3 and meta["world_size"] == 1
    assert meta["metrics"]["val_bpb"] is not None  # the final eval ran after the save and was recorded
    cfg = from_dict(GPTConfig, meta["model_config"])
    a, b = build_model(cfg), build_model(cfg)
    state = load_model_state(ck)
    a.load_state_dict(state)
    b.load_state_dict(state)
    assert any(not torch.equal(v, build_model(cfg).state_dict()[k]) for k, v in state.items())  # it trained
    idx = torch.randint(0, 128, (2, 32))
    la, lb = a(idx), b(idx)
    assert torch.equal(la, lb)
    # and the original weights are the ones saved: a fresh save/load of `a` gives the same logits again
    save_checkpoint(ck.parent, 99, a.state_dict(), None, {"model_config": meta["model_config"]}, keep_last=0)
    c = build_model(cfg)
    c.load_state_dict(load_model_state(ck.parent / "step_000099"))
    assert torch.equal(c(idx), la)


def test_load_model_with_tokenizer(tmp_path):
    from picochat.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello world, the cat sat on the mat. " * 20] * 10, vocab_size=300)
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    cfg = GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    m = build_model(cfg)
    from dataclasses import asdict

    ck = save_checkpoint(tmp_path / "ck", 1, m.state_dict(), None,
                         {"model_config": asdict(cfg), "tokenizer_dir": str(tok_dir)})
    m2, tok2, meta = load_model(ck)
    idx = torch.tensor([tok2.encode("hello world")])
    assert torch.equal(m2(idx), m(idx)) and tok2.vocab_size == tok.vocab_size and meta["step"] == 1
    update_meta(ck, metrics={"val_bpb": 1.5})
    update_meta(ck, metrics={"core": 0.2})
    assert json.loads((ck / "meta.json").read_text())["metrics"] == {"val_bpb": 1.5, "core": 0.2}
