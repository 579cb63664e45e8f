"""The round clock (lte.runtime.clock): where rounds end under each lte.merge_every rule, against
hand computations, and the rules' one-line refusals."""
import pytest

from lte.errors import ConfigError
from lte.runtime.clock import RoundClock, round_ends, round_lengths
from lte.runtime.config import load_config


def clock(*overrides):
    return RoundClock.of(load_config(None, list(overrides)))


def test_a_constant_round_ends_at_its_multiples_and_the_last_step():
    c = clock("train.steps=25", "lte.merge_every=10", "eval.every=2", "checkpoint.every=1")
    assert c.ends == (10, 20, 25)
    assert [c.round_steps(s) for s in (0, 3, 10, 20, 24)] == [10, 7, 10, 5, 1]
    assert [s for s in range(1, 26) if c.ends_round(s)] == [10, 20, 25]
    assert [c.round_of(s) for s in (1, 10, 11, 25)] == [1, 1, 2, 3]
    assert [s for s in range(1, 26) if c.evaluates(s)] == [20, 25]
    assert [s for s in range(1, 26) if c.checkpoints(s)] == [10, 20]


def test_a_list_of_step_and_length_takes_the_length_in_force_at_a_rounds_first_step():
    c = clock("train.steps=30", "lte.merge_every=[[0, 4], [10, 7]]")
    # 0-4, 4-8, 8-12 (starts before 10: 4 long), then 7 long: 12-19, 19-26, 26-30 (cut at the end)
    assert c.ends == (4, 8, 12, 19, 26, 30)
    assert c.round_steps(12) == 7 and c.round_steps(13) == 6 and c.round_of(13) == 4


def test_qsr_rounds_grow_as_the_square_of_the_learning_rates_fall():
    """train.schedule=wsd over 40 steps, no warm-up, the last half a linear decay to 0: f = 1 until
    step 20, then 1 - (step - 20) / 20. T = floor(2 / f^2) within [2, 8], f at each round's first step."""
    c = clock("train.steps=40", "train.warmup_steps=0", "train.schedule=wsd", "train.decay_fraction=0.5",
              "train.min_lr_ratio=0", "lte.merge_every={schedule: qsr, min: 2, max: 8}")
    # from step 20: f 1 -> T 2; 22: f 0.9 -> 2.47 -> 2; 24: 0.8 -> 3.125 -> 3; 27: 0.65 -> 4.73 -> 4;
    # 31: 0.45 -> 9.88 -> 8 (the max); 39: 0.05 -> 8, cut at 40
    assert c.ends == (*range(2, 21, 2), 22, 24, 27, 31, 39, 40)
    assert c.rounds == 16 and c.mean_round() == 40 / 16


def test_qsr_holds_its_minimum_through_warm_up():
    lengths = round_lengths({"schedule": "qsr", "min": 5, "max": 50}, lambda step: 0.01, warmup=20)
    assert round_ends(lengths, 30) == (5, 10, 15, 20, 30)  # the warm-up's learning rate is not its decay


@pytest.mark.parametrize("spec,message", [
    (0, "must be >= 1"),
    ("ten", "must be an integer, a list of [step, T] pairs or"),
    ({"schedule": "cosine", "min": 1, "max": 2}, "as a mapping must be {schedule: qsr"),
    ({"schedule": "qsr", "min": 9, "max": 3}, "1 <= min <= max"),
    ([[5, 10]], "the first at step 0"),
    ([[0, 10], [0, 20]], "the steps increasing"),
    ([[0, 10], [5]], "[[step, T], ...] pairs"),
])
def test_bad_round_rules_are_refused_in_one_line(spec, message):
    with pytest.raises(ConfigError, match="lte.merge_every") as exc:
        round_lengths(spec, lambda step: 1.0, 0)
    assert message in str(exc.value) and "\n" not in str(exc.value)
