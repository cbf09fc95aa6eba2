"""SpellingBee / SimpleSpelling word lists: the real loader against a server on 127.0.0.1, the offline fallbacks,
and train/test words that are disjoint by construction (no test word in any training example)."""

import itertools
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from picochat.config import UserError
from picochat.data import tasks as T
from picochat.data.shards import write_shards
from picochat.data.tasks import SimpleSpelling, SpellingBee, is_test_word, load_words, parse_mixture

SYLLABLES = ["ba", "ke", "mi", "lo", "tu", "ra", "se", "di", "no", "pu", "ga", "fe", "zo", "hi", "wu"]
# ~3,400 made-up words, plus words the task templates use (they must stay in train), in CRLF lines like the real file
WORDS = sorted({"".join(p) for n in (2, 3) for p in itertools.product(SYLLABLES, repeat=n)}
               | {"letter", "count", "spell", "word", "python", "strawberry", "appears", "number", "check",
                  "are", "does", "double", "there"})  # the last four hash to test: kept in train as template words


class WordServer:
    def __init__(self, body: bytes):
        self.body, self.hits = body, 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                srv.hits += 1
                if self.path != "/words_alpha.txt":
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(srv.body)))
                self.end_headers()
                self.wfile.write(srv.body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/words_alpha.txt"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def words_server(monkeypatch):
    s = WordServer("".join(w + "\r\n" for w in WORDS).encode())
    monkeypatch.setenv("PICOCHAT_WORDS_URL", s.url)
    T._words_cache.clear()
    yield s
    s.close()
    T._words_cache.clear()


def _tokens(conv: dict) -> set[str]:
    text = []
    for m in conv["messages"]:
        c = m["content"]
        text += [c] if isinstance(c, str) else [p["text"] for p in c]
    return {w.lower() for w in re.findall(r"[A-Za-z]+", " ".join(text))}


def test_word_list_is_downloaded_once_and_cached(words_server, tmp_path):
    bee = SpellingBee(size=10, task_dir=tmp_path / "tasks")
    cached = tmp_path / "tasks" / "words" / "words_alpha.txt"
    assert cached.read_bytes() == words_server.body and words_server.hits == 1
    assert sorted(T.load_words(tmp_path / "tasks")) == WORDS  # CRLF stripped
    assert len(bee.words) + len(SpellingBee(size=1, split="test", task_dir=tmp_path / "tasks").words) == len(WORDS)
    T._words_cache.clear()
    SimpleSpelling(size=10, task_dir=tmp_path / "tasks")
    assert words_server.hits == 1  # read from the cached file
    assert [p.name for p in cached.parent.iterdir()] == ["words_alpha.txt"]  # no temp files left


def test_train_and_test_words_disjoint_in_every_example(words_server, tmp_path):
    d = tmp_path / "tasks"
    train = [SpellingBee(size=1500, task_dir=d), SimpleSpelling(size=1500, task_dir=d)]
    test = [SpellingBee(size=400, split="test", task_dir=d), SimpleSpelling(size=400, split="test", task_dir=d)]
    test_words = {re.search(r"'(\w+)'\.count", c["messages"][1]["content"][1]["text"])[1] for c in test[0]}
    test_words |= {c["messages"][1]["content"].split(":")[0] for c in test[1]}
    assert len(test_words) > 150 and all(is_test_word(w) for w in test_words)
    train_tokens = set().union(*(_tokens(c) for t in train for c in t))
    assert not test_words & train_tokens  # no test word anywhere in a training example, template text included
    # the split is a property of the word: the same through a mixture, and template words never go to test
    mix = parse_mixture("spelling_bee@300,simple_spelling@300", task_dir=d)
    assert not test_words & set().union(*(_tokens(c) for c in mix))
    assert not any(is_test_word(w) for w in ("letter", "count", "spell", "python", "are", "does", "double", "there"))
    share = sum(map(is_test_word, WORDS)) / len(WORDS)
    assert 0.06 < share < 0.14
    # scoring still works on test items
    c = test[0][0]
    assert test[0].evaluate(c, c["messages"][1]["content"][-1]["text"])


def test_builtin_and_explicit_lists_are_split_too():
    T._words_cache.clear()
    bee_train = SpellingBee(size=500)  # no download (tests), no shards: the built-in words
    bee_test = SpellingBee(size=200, split="test")
    assert set(bee_train.words).isdisjoint(bee_test.words) and bee_test.words
    assert set(bee_train.words) | set(bee_test.words) == set(T._word_list(T.BUILTIN_WORDS))
    assert not {c["answer"] for c in bee_test} - {str(n) for n in range(0, 10)}
    with pytest.raises(UserError, match=r"simple_spelling:test: none of the 1 words falls in the test split"):
        SimpleSpelling(size=5, split="test", words=["hello"])


def test_offline_fallback_to_shard_words(monkeypatch, tmp_path, capsys):
    T._words_cache.clear()
    home = tmp_path / "picochat_home"
    docs = [f"The {w} walked past the {v} near the river. " * 2 for w, v in zip(WORDS[::7], WORDS[1::7])]
    write_shards(docs, home / "data" / "mine", docs_per_shard=200)
    bad = WordServer(b"<html>rate limited</html>")  # not a word list: rejected, nothing kept
    monkeypatch.setenv("PICOCHAT_WORDS_URL", bad.url)
    try:
        bee = SpellingBee(size=20, task_dir=tmp_path / "tasks")
    finally:
        bad.close()
    out = capsys.readouterr().out
    assert "words of the pretraining shards" in out and "not a word list" in out and out.count("\n") == 1
    assert not list((tmp_path / "tasks" / "words").iterdir())
    words = set(load_words(tmp_path / "tasks"))
    assert {"walked", "river", WORDS[0]} <= words and len(words) > 200
    assert all(w in words for w in bee.words)
    T._words_cache.clear()


def test_unreadable_word_file_is_one_clear_error(tmp_path):
    T._words_cache.clear()
    f = tmp_path / "tasks" / "words" / "words_alpha.txt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserError, match=r"words_alpha\.txt: not UTF-8 text at byte 0; delete it"):
        SpellingBee(size=5, task_dir=tmp_path / "tasks")
    T._words_cache.clear()


def test_ranks_starting_together_share_one_download(words_server, tmp_path):
    """Several loaders at once (ranks of one node): each writes its own temp file, one complete list results."""
    errors = []

    def load():
        try:
            T._download_words(tmp_path / "tasks" / "w.txt", words_server.url)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    (tmp_path / "tasks").mkdir()
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and (tmp_path / "tasks" / "w.txt").read_bytes() == words_server.body
    assert [p.name for p in (tmp_path / "tasks").iterdir()] == ["w.txt"]
