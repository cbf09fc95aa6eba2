"""`picochat chat`: one-shot and interactive (piped stdin) against a tiny checkpoint made in the test."""

import io
import os
import sys
from pathlib import Path

import torch

from picochat import cli
from picochat.checkpoint import checkpoints_dir, save_checkpoint
from picochat.config import to_dict
from picochat.model import GPTConfig, build_model
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

REPO = Path(__file__).resolve().parent.parent
SENTENCES = ["Hello there, how are you today?", "The sky is blue because of Rayleigh scattering.",
             "Picochat is a tiny chat model. It answers questions.", "Café, naïve, 日本, 🙂."] * 4


def make_tiny_checkpoint(home: Path, run: str = "tiny", stage: str = "sft", seed: int = 0) -> Path:
    """A random tiny model whose greedy / top-50 choice is never a special token (specials get logit 0, the rest
    are large), so replies are never empty and always run to max_tokens."""
    tok = Tokenizer.train(SENTENCES, vocab_size=300)
    tok_dir = home / "runs" / run / "tokenizer"
    tok.save(tok_dir)
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        model.lm_head.weight.normal_(0, 1.0, generator=g)
        model.lm_head.weight[tok.vocab_size - len(SPECIAL_TOKENS):] = 0.0
    meta = {"stage": stage, "run": run, "model_config": to_dict(cfg), "tokenizer_dir": str(tok_dir), "config": {}}
    os.environ["PICOCHAT_HOME"] = str(home)
    return save_checkpoint(checkpoints_dir(run, stage), 10, model.state_dict(), None, meta)


def test_one_shot(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    make_tiny_checkpoint(home)
    rc = cli.main(["chat", "-p", "Hello there", "--max-tokens", "12", "--temperature", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert len(out.strip()) > 0
    # greedy is deterministic: the same reply again
    cli.main(["chat", "-p", "Hello there", "--max-tokens", "12", "--temperature", "0"])
    assert capsys.readouterr().out == out


def test_base_source_is_plain_completion(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    make_tiny_checkpoint(home, stage="base")
    rc = cli.main(["chat", "--source", "base", "-p", "The sky is", "--max-tokens", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("The sky is") and len(out) > len("The sky is\n")


def test_missing_checkpoint_is_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "empty"))
    assert cli.main(["chat", "-p", "hi"]) == 2
    assert "no 'sft' checkpoint" in capsys.readouterr().err


def test_interactive_history_and_commands(tmp_path):
    """Drive the loop directly: history grows, 'clear' resets it, 'exit' ends; prompts use the chat format."""
    from picochat.serving.chat_cli import ChatConfig, chat
    from picochat.engine import load_engine

    home = tmp_path / "home"
    ckpt = make_tiny_checkpoint(home)
    engine, _ = load_engine(checkpoint=str(ckpt), device="cpu")
    seen = []
    real = engine.generate

    def spy(prompt, *a, **k):
        seen.append(list(prompt))
        return real(prompt, *a, **k)

    engine.generate = spy
    stdin = io.StringIO("Hello there\nHow are you?\nclear\nAgain\nexit\nnever read\n")
    out = io.StringIO()
    assert chat(engine, ChatConfig(max_tokens=6), stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    assert text.count("Assistant: ") == 3 and "(conversation cleared)" in text and "never read" not in text
    tok = engine.tokenizer
    assistant_start = tok.encode_special("<|assistant_start|>")
    assert all(p[0] == tok.bos_id and p[-1] == assistant_start for p in seen)
    assert len(seen[1]) > len(seen[0]) + 6  # the second turn carries the first exchange
    assert len(seen[2]) < len(seen[1])  # after clear: a fresh conversation


def test_piped_stdin_through_cli(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    make_tiny_checkpoint(home)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nquit\n"))
    assert cli.main(["chat", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "User: Hello" in out and "Assistant: " in out


def test_a_random_data_checkpoint_is_one_clear_error(tmp_path, capsys, monkeypatch):
    """A base pretrained on --data random saves no tokenizer_dir: chat, sft and export each say so in one line (it
    was a TypeError traceback from Path(None))."""
    home = tmp_path / "home"
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
    meta = {"stage": "base", "run": "rnd", "model_config": to_dict(cfg), "tokenizer_dir": None, "config": {}}
    save_checkpoint(checkpoints_dir("rnd", "base"), 1, build_model(cfg).state_dict(), None, meta)
    for argv in (["chat", "--run", "rnd", "--source", "base", "-p", "hi"], ["sft", "--run", "rnd", "--device", "cpu"],
                 ["export", "--run", "rnd", "--source", "base", "--out", str(tmp_path / "x")]):
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and "has no tokenizer" in err and "--data random" in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "x").exists()
