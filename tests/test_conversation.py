"""Conversation validation and rendering: golden token layouts, masks, system merge, tool parts, truncation."""

import pytest

from picochat.config import UserError
from picochat.conversation import RenderStats, render, render_for_completion, to_targets, validate
from picochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = ["hello world, what is 2+3? the answer is 5. " * 20, "system prompt: be brief. spell it out. " * 20]
    return Tokenizer.train(texts, vocab_size=300)


def sp(tok, name):
    return tok.encode_special(f"<|{name}|>")


def test_render_golden_layout_and_mask(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = render(tok, conv)
    expect = ([sp(tok, "bos"), sp(tok, "user_start")] + tok.encode("hi") + [sp(tok, "user_end"),
              sp(tok, "assistant_start")] + tok.encode("yo") + [sp(tok, "assistant_end")])
    assert ids == expect
    n_hi, n_yo = len(tok.encode("hi")), len(tok.encode("yo"))
    assert mask == [0, 0] + [0] * n_hi + [0, 0] + [1] * n_yo + [1]


def test_system_message_is_merged_into_first_user_turn(tok):
    conv = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "ok"}]}
    merged = {"messages": [{"role": "user", "content": "be brief\n\nhi"}, {"role": "assistant", "content": "ok"}]}
    assert render(tok, conv) == render(tok, merged)
    assert render(tok, conv)[0].count(sp(tok, "user_start")) == 1


def test_tool_parts_masks(tok):
    parts = [{"type": "text", "text": "so"}, {"type": "python", "text": "2+3"},
             {"type": "python_output", "text": "5"}, {"type": "text", "text": "five"}]
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}]}
    ids, mask = render(tok, conv)
    by_tok = dict(zip(ids, mask))
    for name in ("python_start", "python_end", "assistant_end"):
        assert by_tok[sp(tok, name)] == 1, name
    for name in ("output_start", "output_end", "assistant_start", "bos", "user_start", "user_end"):
        assert by_tok[sp(tok, name)] == 0, name
    o0, o1 = ids.index(sp(tok, "output_start")), ids.index(sp(tok, "output_end"))
    assert all(m == 0 for m in mask[o0:o1 + 1])
    p0, p1 = ids.index(sp(tok, "python_start")), ids.index(sp(tok, "python_end"))
    assert ids[p0 + 1:p1] == tok.encode("2+3") and all(m == 1 for m in mask[p0:p1 + 1])
    inputs, targets = to_targets(ids, mask)
    assert len(inputs) == len(targets) == len(ids) - 1
    assert targets[-1] == sp(tok, "assistant_end")  # the model learns to stop
    assert all(t == -1 for t in targets[: ids.index(sp(tok, "assistant_start"))])


def test_truncation_keeps_whole_turns_and_drops_unfittable(tok):
    long = "the answer is 5. " * 30
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": "more"}, {"role": "assistant", "content": long}]}
    full_ids, _ = render(tok, conv)
    stats = RenderStats()
    ids, mask = render(tok, conv, max_tokens=len(full_ids) - 1, stats=stats)
    first, _ = render(tok, {"messages": conv["messages"][:2]})
    assert ids == first and ids[-1] == sp(tok, "assistant_end") and mask[-1] == 1
    assert (stats.rendered, stats.truncated, stats.dropped, stats.turns_dropped) == (1, 1, 0, 2)
    # not even the first exchange fits -> dropped, counted
    big = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long}]}
    assert render(tok, big, max_tokens=20, stats=stats, where="f.jsonl line 3") == ([], [])
    assert stats.dropped == 1 and stats.examples == ["f.jsonl line 3"]
    # exactly fitting is not truncation
    ids2, _ = render(tok, conv, max_tokens=len(full_ids), stats=stats)
    assert ids2 == full_ids and stats.truncated == 1


def test_render_never_all_masked(tok):
    conv = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}
    _, mask = render(tok, conv)
    assert sum(mask) == 1  # the assistant_end token is always trained on


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": "again"}]}
    ids = render_for_completion(tok, conv)
    assert ids[-1] == sp(tok, "assistant_start")
    assert ids[:-1] == render(tok, conv)[0] + [sp(tok, "user_start")] + tok.encode("again") + [sp(tok, "user_end")]
    # a trailing assistant message (the gold answer) is removed
    gold = {"messages": conv["messages"] + [{"role": "assistant", "content": "B"}]}
    assert render_for_completion(tok, gold) == ids


@pytest.mark.parametrize("conv,needle", [
    ({"messages": [{"role": "assistant", "content": "x"}]}, "message 0 has role 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "message 1"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "img"}]}]},
     "part 0"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"messages": []}, "empty"),
    ({"msgs": []}, "expected an object"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "only allowed first"),
])
def test_validation_errors_name_the_conversation(conv, needle):
    with pytest.raises(UserError) as e:
        validate(conv, "chat_train.jsonl line 17")
    assert "chat_train.jsonl line 17" in str(e.value) and needle in str(e.value)


def test_validation_accepts_known_shapes():
    validate({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [
        {"type": "text", "text": "a"}]}, {"role": "assistant", "content": [{"type": "python", "text": "1"}]}]})
    with pytest.raises(UserError, match="last message"):
        validate({"messages": [{"role": "user", "content": "a"}]}, require_assistant_last=True)
