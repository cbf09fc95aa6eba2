"""`picochat data prepare`, shard helpers (`data download` and `data verify`: test_hub_download.py)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import cli
from picochat.config import UserError
from picochat.data.shards import check_parquet, iter_texts, list_shards, prepare, write_shards


def _texts(path):
    return pq.read_table(path).column("text").to_pylist()


def test_write_shards_row_groups_and_atomic(tmp_path):
    docs = [f"doc {i}" for i in range(2500)]
    paths = write_shards(iter(docs), tmp_path, docs_per_shard=2048, row_group=1024)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet"]
    pf = pq.ParquetFile(paths[0])
    assert pf.num_row_groups == 2 and pf.metadata.row_group(0).num_rows == 1024
    assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    assert _texts(paths[0]) + _texts(paths[1]) == docs
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    train, val = list_shards(tmp_path)
    assert train == paths[:1] and val == paths[1:]
    assert list(iter_texts(paths, max_chars=20)) == docs[:4]  # stops once 20 chars were yielded
    assert list(iter_texts(paths[:1], doc_cap=3))[:2] == ["doc", "doc"]


def test_list_shards_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist.*picochat data synth"):
        list_shards(tmp_path / "nope")
    with pytest.raises(UserError, match="no shard_"):
        list_shards(tmp_path)
    write_shards(["a"], tmp_path, 10)
    with pytest.raises(UserError, match="only one shard"):
        list_shards(tmp_path)


def test_prepare_txt_jsonl_parquet(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first doc\nline two\n\nsecond doc\n\n\nthird doc\n")
    (src / "b.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i}", "id": i}) for i in range(30)) + "\n")
    pq.write_table(pa.table({"text": [f"parquet doc {i}" for i in range(2000)]}), src / "c.parquet")
    out = tmp_path / "out"
    s = prepare([src / "a.txt", src / "b.jsonl", src / "c.parquet"], out, val_docs=100, docs_per_shard=1024,
                split_blank_lines=True)
    assert s["docs"] == 3 + 30 + 2000 and s["val_docs"] == 100
    train, val = list_shards(out)
    all_train = [d for p in train for d in _texts(p)]
    assert all_train[:3] == ["first doc\nline two", "second doc", "third doc"]
    assert all_train[3] == "json doc 0"
    assert _texts(val[0]) == [f"parquet doc {i}" for i in range(1900, 2000)]  # val = the last docs
    assert len(all_train) == 2033 - 100
    for p in train:
        pf = pq.ParquetFile(p)
        assert all(pf.metadata.row_group(i).num_rows <= 1024 for i in range(pf.num_row_groups))
    # Default: one txt file = one document; val defaults to 10% of the docs.
    s = prepare([src / "a.txt", src / "b.jsonl"], tmp_path / "out2")
    assert s["docs"] == 31 and s["val_docs"] == 3
    # Refuses to mix with existing shards unless --overwrite.
    with pytest.raises(UserError, match="already holds"):
        prepare([src / "b.jsonl"], out)
    prepare([src / "b.jsonl"], out, overwrite=True)
    assert len(list(out.glob("shard_*.parquet"))) == 2


def test_prepare_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff\xfe world")
    with pytest.raises(UserError, match=r"bad\.txt: not valid UTF-8.*--errors replace"):
        prepare([bad, bad], tmp_path / "o1")
    assert not list((tmp_path / "o1").glob("*.parquet")) if (tmp_path / "o1").exists() else True
    s = prepare([bad, bad], tmp_path / "o2", errors="replace")
    assert "\ufffd" in _texts(list_shards(tmp_path / "o2")[0][0])[0] and s["docs"] == 2

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match=r"empty\.jsonl: no documents"):
        prepare([empty], tmp_path / "o3")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"broken\.jsonl:2: invalid JSON"):
        prepare([broken], tmp_path / "o4")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"nofield\.jsonl:1: .*'text' field"):
        prepare([nofield], tmp_path / "o5")
    one = tmp_path / "one.txt"
    one.write_text("just one doc")
    with pytest.raises(UserError, match="only 1 document"):
        prepare([one], tmp_path / "o6")
    with pytest.raises(UserError, match="does not exist"):
        prepare([tmp_path / "missing.txt"], tmp_path / "o7")


def test_prepare_cli(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)))
    assert cli.main(["data", "prepare", str(src), "--out", str(tmp_path / "o"), "--val-docs", "5"]) == 0
    assert "50 docs" in capsys.readouterr().out
    assert len(_texts(list_shards(tmp_path / "o")[1][0])) == 5
    assert cli.main(["data", "prepare", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "o9")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_check_parquet(tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), p)
    check_parquet(p)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match="not a complete parquet"):
        check_parquet(p)
    pq.write_table(pa.table({"body": ["a"]}), p)
    with pytest.raises(ValueError, match="no 'text' column"):
        check_parquet(p)


def test_synth_cli_delegates():
    """synth.py's flags are wired into `data synth` (its behaviour is tested in test_synth.py)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "synth", "--help"])
    assert e.value.code == 0
