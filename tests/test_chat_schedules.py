"""The chat stages' LR schedules (picochat/scaling.py): pure functions of the step."""

from picochat import scaling


def test_warmdown_is_flat_then_linear_to_zero():
    assert scaling.warmdown_multiplier(0.0, 0.5) == 1.0
    assert scaling.warmdown_multiplier(0.49, 0.5) == 1.0
    assert scaling.warmdown_multiplier(0.75, 0.5) == 0.5
    assert scaling.warmdown_multiplier(1.0, 0.5) == 0.0
    assert scaling.warmdown_multiplier(0.99, 0.0) == 1.0  # no warmdown


def test_chat_multiplier_is_the_warmdown_of_the_progress():
    total = 10
    sft = [scaling.chat_lr_multiplier(s, total, 0.5) for s in range(total)]
    assert sft[:5] == [1.0] * 5 and sft[5] == 1.0  # progress 0.5 is the first warmdown step: still 1
    assert all(a > b for a, b in zip(sft[5:], sft[6:])) and sft[-1] > 0
    assert [scaling.chat_lr_multiplier(s, total, 0.2) for s in range(total)][:8] == [1.0] * 8
    assert scaling.chat_lr_multiplier(9, 10, 0.2) == scaling.warmdown_multiplier(9 / 10, 0.2)


def test_rl_multiplier_decays_linearly_from_one():
    assert scaling.rl_lr_multiplier(0, 4) == 1.0
    assert [scaling.rl_lr_multiplier(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
