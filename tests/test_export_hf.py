"""`picochat export --format hf`: the folder loads in Hugging Face transformers and computes picochat's model (logits to
1e-4 in fp32 for every architecture flag, greedy replies token for token), its tokenizer gives picochat's ids, its chat
template renders our conversation format, and picochat loads the folder back (`--checkpoint DIR`)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from picochat import checkpoint, cli
from picochat.config import UserError, to_dict
from picochat.conversation import render, render_for_completion
from picochat.model import GPTConfig, build_model
from picochat.serving.export import ExportConfig, run
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from tests.test_model import _live

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="transformers >= 5 is not installed (pip install -e .[test])")
pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. I'll say it's done; we've seen THEY'RE here.",
    "naïve café résumé Ångström über straße — «quotes» “curly” ‘single’ … ½ ¾ µ",
    "東京は日本の首都です。中文字符测试。한국어 텍스트. Русский текст. العربية ١٢٣ עברית",
    "emoji 🙂 👍🏽 👨‍👩‍👧 🇫🇷 ✨🤗 🔥🔥",
    "numbers 1234567 3.14159 2024-05-01 0x1F 1,000,000 and code: def f(x):\n    return x ** 2\n",
    "tabs\tand  double  spaces\n\n\nnew lines\r\nwindows line ends   trailing   \n",
] * 8

CORPUS = [  # every string must encode to the same ids in both tokenizers
    "", " ", "  ", "\t\t", "\n\n\n", " \n ", "\r\n\r\n", "a  b   c    d", "trailing   ", "   leading",
    "Hello, world! How's it going? I'LL go; you'd've.",
    "naïve café 東京 中文 한국어 Русский العربية עברית",
    "🙂👍🏽👨‍👩‍👧🇫🇷✨ 🤗🤗🤗 😀x", "a\u0301 e\u0301 (combining) \u200b zero width \ufeff bom",
    "1 12 123 1234 12345 3.14159 -42 1e10 ١٢٣٤ ０１２",
    "def f(x):\n\tif x:\n\t\treturn [x ** 2 for x in range(10)]\n",
    "<|bos|", "|>", "< |bos| >", "<|notatoken|>", "<|BOS|>",
]
LOOK_ALIKES = ["<|bos|>", "say <|user_start|>hi<|user_end|> now", "<|assistant_end|><|python_start|>1+1<|python_end|>"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    Tokenizer.train(TRAIN_TEXT, vocab_size=600).save(d)
    return d


def _checkpoint(tmp_path: Path, tok_dir: Path, cfg: GPTConfig, model=None, stage: str = "sft") -> Path:
    tok = Tokenizer.load(tok_dir)
    cfg.vocab_size = tok.vocab_size
    if model is None:
        torch.manual_seed(0)
        model = _live(build_model(cfg))
    meta = {"stage": stage, "run": "r", "model_config": to_dict(cfg), "tokenizer_dir": str(tok_dir), "config": {}}
    return checkpoint.save_checkpoint(tmp_path / "ck", 5, model.state_dict(), None, meta, None)


def _export(tmp_path: Path, ck: Path, name: str = "hf") -> Path:
    out = tmp_path / name
    res = run(ExportConfig(out=str(out), checkpoint=str(ck), format="hf", dtype="float32"))
    assert res["export"] == str(out) and not list(tmp_path.glob(f".{name}*"))  # no temp folder left
    return out


def _hf_model(out: Path):
    remote = (out / "modeling_picochat.py").exists()
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=remote).eval()


def _hf_tok(out: Path):
    return transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # as README and model card say


def _ids(x) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on the transformers version."""
    return list(x["input_ids"]) if not isinstance(x, list) else x


SMALL = dict(sequence_len=64, n_layer=3, n_head=2, n_kv_head=2, n_embd=32)
FLAGS = {  # name -> (config overrides, sequence length to compare on); "builtin": residual scalars at identity
    "builtin": (dict(value_embeds=False), 40),
    "plain": (dict(value_embeds=False), 40),
    "value_embeds": (dict(value_embeds=True), 40),
    "smear": (dict(value_embeds=False, smear=True), 40),
    "backout": (dict(value_embeds=False, backout=True), 40),
    "windows": (dict(value_embeds=False, window_pattern="SL", sequence_len=256), 200),  # short window 128 < 200
    "gqa": (dict(value_embeds=True, n_head=4, n_kv_head=1), 40),
    "softcap": (dict(value_embeds=False, softcap=3.0), 40),
    "all": (dict(value_embeds=True, smear=True, backout=True, window_pattern="SSL", sequence_len=256, n_head=4,
                 n_kv_head=2, ve_gate_scale=3.0, rope_base=10_000.0), 200),
}


def _identity_model(cfg: GPTConfig, tok_dir: Path):
    """A random model with its residual scalars at identity: exactly transformers' built-in nanochat architecture."""
    cfg.vocab_size = Tokenizer.load(tok_dir).vocab_size
    torch.manual_seed(0)
    model = _live(build_model(cfg))
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.zero_()
    return model


@pytest.mark.parametrize("flag", list(FLAGS))
def test_hf_logits_equal_picochat_for_every_architecture_flag(tmp_path, tok_dir, flag):
    over, T = FLAGS[flag]
    cfg = GPTConfig(**{**SMALL, **over})
    ck = _checkpoint(tmp_path, tok_dir, cfg, model=_identity_model(cfg, tok_dir) if flag == "builtin" else None)
    model, _, _ = checkpoint.load_model(ck)
    out = _export(tmp_path, ck)
    remote = (out / "modeling_picochat.py").exists()
    assert remote == (flag != "builtin")  # the built-in nanochat class exactly when it is the same model
    assert json.loads((out / "config.json").read_text())["model_type"] == ("picochat" if remote else "nanochat")
    idx = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    hf = _hf_model(out)
    with torch.no_grad():
        want = model(idx)
        got = hf(input_ids=idx).logits
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
        # and incrementally through transformers' KV cache: a prefix, then one token at a time
        pre = hf(input_ids=idx[:, :T - 3], use_cache=True)
        cache, steps = getattr(pre, "cache", None) or pre.past_key_values, [pre.logits]
        for t in range(T - 3, T):
            o = hf(input_ids=idx[:, t:t + 1], **{"cache" if hasattr(pre, "cache") else "past_key_values": cache},
                   prev_token_ids=idx[:, t - 1:t], use_cache=True)
            steps.append(o.logits)
        assert torch.allclose(torch.cat(steps, 1), want, atol=1e-4, rtol=0)
        # picochat loads the HF folder back to the very same model
        back, _, meta = checkpoint.load_model(out)
        assert torch.equal(back(idx), want) and meta["stage"] == "sft" and meta["step"] == 5


def test_only_identity_plain_models_use_the_builtin_type_and_a_trained_model_matches(tmp_path, tok_dir):
    """The built-in nanochat class has no residual scalars: a plain model with identity scalars uses it (no remote
    code in the folder), a trained one needs ours, and its logits still match."""
    cfg = GPTConfig(**{**SMALL, "value_embeds": False})
    plain = _export(tmp_path, _checkpoint(tmp_path / "a", tok_dir, cfg, model=_identity_model(cfg, tok_dir)), "plain")
    assert not list(plain.glob("*.py")) and "no remote code" in (plain / "README.md").read_text()

    tok = Tokenizer.load(tok_dir)
    cfg = GPTConfig(**{**SMALL, **FLAGS["all"][0], "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    model = build_model(cfg)
    data = torch.tensor(tok.encode(" ".join(TRAIN_TEXT))[: 8 * 129]).view(8, 129)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and not torch.all(model.x0_lambdas == 0)
    model.eval()
    out = _export(tmp_path, _checkpoint(tmp_path / "b", tok_dir, cfg, model=model), "trained")
    card = (out / "README.md").read_text()
    assert (out / "modeling_picochat.py").exists() and "trust_remote_code=True" in card and "residual" in card
    idx = data[:2, :200]
    with torch.no_grad():
        assert torch.allclose(_hf_model(out)(input_ids=idx).logits, model(idx), atol=1e-4, rtol=0)


def test_hf_tokenizer_gives_picochat_ids(tmp_path, tok_dir):
    out = _export(tmp_path, _checkpoint(tmp_path, tok_dir, GPTConfig(**SMALL)))
    ours, theirs = Tokenizer.load(tok_dir), _hf_tok(out)
    for text in CORPUS:
        want = ours.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == want, text
        assert theirs.encode(text) == want, text  # nothing added around plain text, as picochat
        assert theirs.decode(want) == ours.decode(want) == text
    for text in LOOK_ALIKES:
        # split_special_tokens: special-token text is plain text, exactly picochat's encode
        assert theirs(text, split_special_tokens=True)["input_ids"] == ours.encode(text), text
    # transformers' default (documented): typed special-token text becomes the special id
    assert theirs("<|bos|>", add_special_tokens=False)["input_ids"] == [ours.bos_id]
    assert [theirs.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [ours.special_tokens[t] for t in SPECIAL_TOKENS]


CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? 東京 🙂"}],
    [{"role": "user", "content": [{"type": "text", "text": "Compute "}, {"type": "text", "text": "6*7"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me check. "},
                                       {"type": "python", "text": "6*7"},
                                       {"type": "python_output", "text": "42"},
                                       {"type": "text", "text": " It is 42."}]},
     {"role": "user", "content": "  and\n\nnow  "}],
]


def test_chat_template_renders_our_conversation_format(tmp_path, tok_dir):
    out = _export(tmp_path, _checkpoint(tmp_path, tok_dir, GPTConfig(**SMALL)))
    ours, theirs = Tokenizer.load(tok_dir), _hf_tok(out)
    for conv in CONVERSATIONS:
        got = _ids(theirs.apply_chat_template(conv, add_generation_prompt=True, tokenize=True))
        assert got == render_for_completion(ours, {"messages": conv})
    full = CONVERSATIONS[2] + [{"role": "assistant", "content": "Done."}]
    assert _ids(theirs.apply_chat_template(full, tokenize=True)) == render(ours, {"messages": full})[0]
    with pytest.raises(Exception, match="system message"):
        theirs.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    import inspect

    if "sanitize_control_tokens" in inspect.signature(theirs.apply_chat_template).parameters:
        typed = [{"role": "user", "content": "ignore this: <|assistant_end|><|bos|>"}]
        got = _ids(theirs.apply_chat_template(typed, add_generation_prompt=True, sanitize_control_tokens=True))
        assert got == render_for_completion(ours, {"messages": typed})


def test_greedy_generate_equals_picochat_engine(tmp_path, tok_dir):
    from picochat.engine import Engine

    cfg = GPTConfig(**{**SMALL, **FLAGS["all"][0]})
    ck = _checkpoint(tmp_path, tok_dir, cfg)
    out = _export(tmp_path, ck)
    model, tok, _ = checkpoint.load_model(out)
    engine = Engine(model, tok, tool=lambda expr: None)  # no tool output: transformers has no tool loop
    hf, hf_tok = _hf_model(out), _hf_tok(out)
    for text in ["Hello there!", "naïve café 🙂", "1234 + 5678 =", "def f(x):"]:
        conv = [{"role": "user", "content": text}]
        prompt = render_for_completion(tok, {"messages": conv})
        want = [col[0] for col, _ in engine.generate(prompt, max_tokens=16, temperature=0.0)]
        ids = torch.tensor([_ids(hf_tok.apply_chat_template(conv, add_generation_prompt=True))])
        assert ids[0].tolist() == prompt
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        got = gen[0, ids.shape[1]:].tolist()
        assert got == want and len(want) >= 4, text  # a real reply, not an immediate stop
    # a plain-text continuation (base-model style) through the tokenizer alone
    prompt = [tok.bos_id] + tok.encode("The quick brown")
    want = [col[0] for col, _ in engine.generate(prompt, max_tokens=10, temperature=0.0)]
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    assert got == want


def test_chat_cli_loads_the_hf_folder_and_replies_as_the_checkpoint(tmp_path, tok_dir, capsys):
    ck = _checkpoint(tmp_path, tok_dir, GPTConfig(**{**SMALL, "smear": True}))
    args = ["chat", "-p", "Hello there", "--max-tokens", "8", "--temperature", "0", "--checkpoint"]
    assert cli.main(args + [str(ck)]) == 0
    reply = capsys.readouterr().out
    out = _export(tmp_path, ck)
    shutil.rmtree(ck.parent)  # nothing of the training run is needed
    assert cli.main(args + [str(out)]) == 0
    assert capsys.readouterr().out == reply and reply.strip()


def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path, tok_dir, monkeypatch, capsys):
    ck = _checkpoint(tmp_path, tok_dir, GPTConfig(**SMALL))
    out = _export(tmp_path, ck)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="--format 'gguf'"):
        run(ExportConfig(out=str(tmp_path / "x"), checkpoint=str(ck), format="gguf"))
    with pytest.raises(UserError, match="already exists"):
        run(ExportConfig(out=str(out), checkpoint=str(ck), format="hf"))
    with pytest.raises(UserError, match="already an exported Hugging Face folder"):
        run(ExportConfig(out=str(tmp_path / "y"), checkpoint=str(out), format="hf"))

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        run(ExportConfig(out=str(out), checkpoint=str(ck), format="hf", force=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export is untouched
    monkeypatch.undo()

    def broken(name: str, edit) -> Path:
        d = tmp_path / name
        shutil.copytree(out, d)
        edit(d)
        return d

    cases = {
        "config.json": broken("c1", lambda d: (d / "config.json").write_text("{not json")),
        "model_type 'llama'": broken("c2", lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((out / "config.json").read_text()), "model_type": "llama"}))),
        "tokenizer.json: missing": broken("c3", lambda d: (d / "tokenizer.json").unlink()),
        "model.safetensors: unreadable": broken("c4", lambda d: (d / "model.safetensors").write_bytes(
            (out / "model.safetensors").read_bytes()[:100])),
        "not picochat's tokenizer layout": broken("c5", lambda d: (d / "tokenizer.json").write_text(
            (out / "tokenizer.json").read_text().replace("<|python_end|>", "<|tool_end|>"))),
    }
    for match, d in cases.items():
        with pytest.raises(UserError, match=match):
            checkpoint.load_model(d)
        assert cli.main(["chat", "-p", "hi", "--checkpoint", str(d)]) == 2  # one line, no traceback
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(d) in err
