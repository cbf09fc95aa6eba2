"""The chat stages' shared skeleton (picochat/stages/chat.py): the stage opener's one `finally`, the step loop's
stop-at-a-step-boundary and the resume that continues from it, and the config base every stage derives from."""

import dataclasses
import signal
from functools import partial

import pytest
import torch

from picochat import checkpoint, training
from picochat.config import to_dict
from picochat.model import GPTConfig, build_model
from picochat.runtime import default_tokenizer_dir
from picochat.stages import chat, midtrain, rl, sft
from picochat.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16


def _tiny_base(run: str = "s"):
    """An untrained 1-layer base checkpoint (the skeleton is tested, not learning)."""
    tok = Tokenizer.train(["hello there, how are you? fine thanks. " * 50], vocab_size=300)
    tdir = default_tokenizer_dir()
    tok.save(tdir)
    cfg = GPTConfig(sequence_len=SEQ, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    meta = {"stage": "base", "run": run, "model_config": to_dict(cfg), "tokenizer_dir": str(tdir),
            "config": {"data_dir": "", "total_batch_size": 2 * SEQ, "device_batch_size": 2, "max_seq_len": SEQ}}
    return checkpoint.save_checkpoint(checkpoint.checkpoints_dir(run, "base"), 1, build_model(cfg).state_dict(),
                                      None, meta, None)


def _open(cfg, steps: int = 4):
    return chat.open_stage("sft", cfg, source="base", source_order=("base",), shape_of=partial(chat.inherit, cfg),
                           setup=lambda st: (steps, {}))


def _lm_step(st: chat.Stage, stop_at: int = 0) -> chat.StepOut:
    """A next-token step on fixed random tokens; asks to stop (as SIGTERM would) at step `stop_at`."""
    g = torch.Generator().manual_seed(st.step)
    x = torch.randint(0, st.tok.vocab_size, (2, SEQ + 1), generator=g)
    loss = st.train_model(x[:, :-1], x[:, 1:])
    st.opt.arm(True)
    loss.backward()
    if stop_at and st.step + 1 == stop_at:
        st.stop.requested = True
    return chat.StepOut(loss.detach(), 2 * SEQ, "", {})


def _loop(st: chat.Stage, stop_at: int = 0):
    return chat.train_loop(st, step_fn=partial(_lm_step, stop_at=stop_at), evaluate=lambda st, at: {"val": 0.0},
                           lr_at=lambda step, total: 1.0, doing="training", oom_shape=(2, SEQ, 2 * SEQ))


def test_open_stage_restores_signals_and_closes_metrics_when_the_stage_fails():
    _tiny_base()
    cfg = sft.SFTConfig(device="cpu", eval_every=0)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="boom"):
        with _open(cfg) as st:
            assert signal.getsignal(signal.SIGTERM) != before  # the stop flag is installed
            metrics = st.metrics
            assert metrics._f is not None
            raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) == before
    assert metrics._f is None


def test_a_stop_request_checkpoints_at_the_step_boundary_and_resume_continues_there(capsys):
    _tiny_base()
    cfg = sft.SFTConfig(device="cpu", dtype="float32", eval_every=0)
    with _open(cfg) as st:
        assert st.already_trained() is None
        assert _loop(st, stop_at=2) is None
        out = st.result(None)
    assert out["stopped"] and out["step"] == 2 and out["checkpoint"].endswith("step_000002")
    with _open(cfg) as st:
        assert (st.step, st.num_steps, st.resume_from.name) == (2, 4, "step_000002")
        final = _loop(st)
        assert final == {"step": 4, "val": 0.0} and st.last_ckpt.name == "step_000004"
        # each process reports its start-up once, after its own first step (a resume too)
        assert capsys.readouterr().out.count("[startup] first step done") == 2
        startups = [r["step"] for r in training.read_metrics(st.out_dir / "metrics.jsonl") if "startup" in r]
        assert startups == [1, 3]
    with _open(cfg) as st:  # nothing left: the stage reports the saved result instead of training again
        assert st.already_trained()["step"] == 4


def test_every_chat_stage_config_derives_from_the_shared_base():
    base = {f.name: f.type for f in dataclasses.fields(chat.ChatStageConfig)}
    for cls in (sft.SFTConfig, midtrain.MidtrainConfig, rl.RLConfig):
        assert issubclass(cls, chat.ChatStageConfig)
        own = {f.name: f.type for f in dataclasses.fields(cls)}
        assert {k: own[k] for k in base} == base, cls
    assert "compile" in {f.name for f in dataclasses.fields(sft.SFTConfig)}  # wired through prepare_model
    assert (rl.RLConfig().device_batch_size, rl.RLConfig().init_lr_frac, midtrain.MidtrainConfig().init_lr_frac,
            sft.SFTConfig().init_lr_frac) == (8, 0.05, 1.0, 0.8)
