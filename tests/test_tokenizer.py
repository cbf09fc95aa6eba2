"""Tokenizer: training backends, round trips, special-token safety, save/load, CLI and bench."""

import argparse
import random

import pytest

from picochat import cli
from picochat.config import UserError
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, _rustbpe_available

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))\n",
    "Numbers: 3.14159, 2,718, 1999-12-31, 42 apples and 1000000 grains of rice.",
    "Ünïcödé tèxt, 中文字符, русский текст, emoji 🙂🚀 and Ελληνικά.",
] * 20

BACKENDS = ["tokenizers"] + (["rustbpe"] if _rustbpe_available() else [])


@pytest.fixture(scope="module", params=BACKENDS)
def tok(request):
    return Tokenizer.train(TRAIN_TEXT, vocab_size=400, backend=request.param)


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F),
              (0x300, 0x36F), (0x9, 0xD)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_round_trip_arbitrary_unicode_and_bytes(tok):
    rng = random.Random(0)
    for i in range(200):
        text = _random_unicode(rng, rng.randint(0, 80))
        assert tok.decode(tok.encode(text)) == text
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 60)))
        for decoded in (raw.decode("latin-1"), raw.decode("utf-8", errors="replace")):
            assert tok.decode(tok.encode(decoded)) == decoded
    ids = tok.encode("hello world")
    assert tok.decode_bytes(ids) == b"hello world"
    assert tok.encode(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_special_strings_in_text_stay_text(tok):
    n_ordinary = tok.vocab_size - len(SPECIAL_TOKENS)
    text = "hi " + " ".join(SPECIAL_TOKENS) + " <|endoftext|><|bos|>"
    ids = tok.encode(text)
    assert max(ids) < n_ordinary
    assert tok.decode(ids) == text
    for batch in tok.encode([text, text]):
        assert max(batch) < n_ordinary
    ids = tok.encode("x", prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"))
    assert ids[0] == tok.bos_id and ids[-1] == tok.encode_special("<|assistant_end|>")
    assert tok.bos_id == n_ordinary  # specials are the last ids
    assert sorted(tok.special_tokens.values()) == list(range(n_ordinary, tok.vocab_size))


def test_save_load_and_token_bytes(tok, tmp_path):
    tok.save(tmp_path / "t")
    again = Tokenizer.load(tmp_path / "t", expect_vocab_size=tok.vocab_size)
    sample = "Ünïcödé 12345 the quick fox 🙂"
    assert again.encode(sample) == tok.encode(sample)
    tb = again.token_bytes()
    assert tb.shape == (tok.vocab_size,)
    assert int(tb[tok.bos_id]) == 0 and all(int(tb[i]) == 1 for i in range(256))
    ids = tok.encode(sample)
    assert sum(int(tb[i]) for i in ids) == len(sample.encode())


def test_load_errors(tok, tmp_path):
    with pytest.raises(UserError, match="no tokenizer here"):
        Tokenizer.load(tmp_path / "missing")
    tok.save(tmp_path / "t")
    with pytest.raises(UserError, match=f"vocab {tok.vocab_size} but the checkpoint expects 999"):
        Tokenizer.load(tmp_path / "t", expect_vocab_size=999)
    (tmp_path / "t" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt tokenizer"):
        Tokenizer.load(tmp_path / "t")


def test_train_errors():
    with pytest.raises(UserError, match="--vocab-size 100"):
        Tokenizer.train(TRAIN_TEXT, vocab_size=100)
    with pytest.raises(UserError, match="--backend"):
        Tokenizer.train(TRAIN_TEXT, vocab_size=300, backend="nope")


def test_numbers_split_in_two_digit_chunks(tok):
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert all(len(p) <= 2 for p in pieces)


def test_cli_train_and_eval(shared_data, tmp_path, capsys):
    out = tmp_path / "tok"
    rc = cli.main(["tokenizer", "train", "--data", str(shared_data / "pretrain_tiny"), "--vocab-size", "512",
                   "--max-chars", "300000", "--out", str(out)])
    assert rc == 0
    msg = capsys.readouterr().out
    assert "trained vocab 512" in msg and "bytes/token" in msg
    assert Tokenizer.load(out).vocab_size == 512 and (out / "token_bytes.pt").exists()
    assert cli.main(["tokenizer", "eval", "--tokenizer", str(out), "--data", str(shared_data / "pretrain_tiny"),
                     "--max-chars", "100000"]) == 0
    table = capsys.readouterr().out
    for name in ("train", "val", "prose", "code", "numbers"):
        assert f"\n{name}" in table
    assert cli.main(["tokenizer", "train", "--data", str(tmp_path / "nodata")]) == 2
    assert "picochat data synth" in capsys.readouterr().err


def test_bench_tokenizer_small(tmp_path):
    from picochat.data.shards import write_shards
    from picochat.tokenizer import bench_main

    write_shards(TRAIN_TEXT * 3, tmp_path, docs_per_shard=100)
    args = argparse.Namespace(data=tmp_path, vocab_size=350, shards="0-1", doc_cap=10_000, threads=2)
    result = bench_main(args)
    assert result["docs"] == 200 and result["train_s_tokenizers"] >= 0 and result["bytes_per_token"] > 1
    with pytest.raises(UserError, match="--shards 0-9"):
        bench_main(argparse.Namespace(data=tmp_path, vocab_size=350, shards="0-9", doc_cap=100, threads=1))
