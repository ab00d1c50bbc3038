"""Bitwidth schedules: exact bits per epoch, and every bad argument rejected at construction."""

import math

import pytest
from omegaconf import OmegaConf

from callbacks.schedules import (
    ConstantBitwidth,
    CosineBitwidth,
    LinearBitwidth,
    ListBitwidth,
    StepBitwidth,
    as_schedule,
)


def bits(schedule, epochs=8):
    return [schedule(e) for e in range(epochs)]


def test_constant():
    assert bits(ConstantBitwidth(4), 3) == [4, 4, 4]


def test_step_takes_the_latest_milestone():
    assert bits(StepBitwidth({0: 16, 3: 8, 5: 4})) == [16, 16, 16, 8, 8, 4, 4, 4]
    assert bits(StepBitwidth({"0": 8, "2": 4}), 4) == [8, 8, 4, 4]  # keys from the command line


def test_linear_interpolates_and_rounds():
    assert bits(LinearBitwidth(16, 4, 0, 3), 6) == [16, 12, 8, 4, 4, 4]
    assert bits(LinearBitwidth(8, 2, 2, 5)) == [8, 8, 8, 6, 4, 2, 2, 2]
    assert bits(LinearBitwidth(8, 3, 0, 2), 3) == [8, 6, 3]  # 5.5 rounds half up to 6
    assert bits(LinearBitwidth(4, 4, 3, 3), 5) == [4] * 5


def test_cosine_follows_a_half_cosine():
    schedule = CosineBitwidth(16, 4, 0, 4)
    expected = [math.floor(16 - 12 * (1 - math.cos(math.pi * e / 4)) / 2 + 0.5) for e in range(5)]
    assert bits(schedule, 5) == expected == [16, 14, 10, 6, 4]
    assert schedule(100) == 4


def test_as_schedule_accepts_every_documented_form():
    assert as_schedule(6) == ConstantBitwidth(6)
    assert as_schedule({0: 8, 2: 4}) == StepBitwidth({0: 8, 2: 4})
    assert bits(as_schedule([16, 8, 4]), 5) == [16, 8, 4, 4, 4]
    assert bits(as_schedule(lambda epoch: 8 if epoch < 2 else 3), 4) == [8, 8, 3, 3]
    assert bits(as_schedule(OmegaConf.create({0: 16, 1: 4})), 3) == [16, 4, 4]
    assert bits(as_schedule(OmegaConf.create([8, 6])), 3) == [8, 6, 6]
    linear = LinearBitwidth(16, 4, 0, 3)
    assert as_schedule(linear) is linear


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: ConstantBitwidth(1), ValueError, r"`bits` must be an int in 2\.\.32, got 1"),
        (lambda: ConstantBitwidth(8.0), TypeError, r"`bits`.*got 8\.0"),
        (lambda: StepBitwidth({1: 8}), ValueError, r"must contain epoch 0"),
        (lambda: StepBitwidth({0: 8, -1: 4}), ValueError, r"epoch -1.*>= 0"),
        (lambda: StepBitwidth({0: 8, 2: 40}), ValueError, r"`milestones\[2\]` must be an int in 2\.\.32, got 40"),
        (lambda: StepBitwidth({}), TypeError, r"non-empty dict"),
        (lambda: StepBitwidth([8, 4]), TypeError, r"`milestones` must be a non-empty dict"),
        (lambda: LinearBitwidth(16, 4, 5, 2), ValueError, r"`end_epoch` \(2\) must be >= `start_epoch` \(5\)"),
        (lambda: LinearBitwidth(16, 4, -1, 2), ValueError, r"`start_epoch` must be an int epoch >= 0, got -1"),
        (lambda: CosineBitwidth(16, 0, 0, 2), ValueError, r"`end_bits` must be an int in 2\.\.32, got 0"),
        (lambda: ListBitwidth([]), ValueError, r"at least one"),
        (lambda: as_schedule([8, 1]), ValueError, r"`schedule\[1\]` must be an int in 2\.\.32, got 1"),
        (lambda: as_schedule("8"), TypeError, r"`schedule` must be an int, a dict"),
        (lambda: as_schedule(True), TypeError, r"`schedule` must be"),
        (lambda: as_schedule(None), TypeError, r"`schedule` must be"),
        (lambda: as_schedule(lambda epoch: 64), ValueError, r"`schedule\(0\)` must be an int in 2\.\.32, got 64"),
    ],
)
def test_bad_schedules_fail_at_construction(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_negative_epoch_is_rejected():
    with pytest.raises(ValueError, match=r"`epoch` must be an int epoch >= 0, got -2"):
        ConstantBitwidth(4)(-2)
