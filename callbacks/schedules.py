"""Bitwidth schedules: pure functions of the epoch, ``schedule(epoch) -> bits``.

Being pure functions of the epoch, they need no state of their own: a run resumed at
epoch 7 asks for ``schedule(7)`` and gets what the uninterrupted run had. Every argument is
validated at construction, so a bad schedule fails before training starts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

from torchapprox.quantizers.approx_quantizer import check_bitwidth


def _check_epoch(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int epoch >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"`{name}` must be an int epoch >= 0, got {value}")
    return int(value)


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even (round(10.5) == 10): schedules want the plain rule.
    return math.floor(x + 0.5)


class BitwidthSchedule:
    """Base of the schedules: callable with the epoch (an int >= 0), returns the bits."""

    def __call__(self, epoch: int) -> int:
        return self.bits_at(_check_epoch(epoch, "epoch"))

    def bits_at(self, epoch: int) -> int:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


class ConstantBitwidth(BitwidthSchedule):
    """The same bits every epoch: ``ConstantBitwidth(4)``."""

    def __init__(self, bits: int) -> None:
        self.bits = check_bitwidth(bits, "bits")

    def bits_at(self, epoch: int) -> int:
        return self.bits

    def final_position(self) -> int:
        return 0


class StepBitwidth(BitwidthSchedule):
    """Piecewise constant: the bits of the latest milestone at or before the epoch.

    ``StepBitwidth({0: 16, 3: 8, 6: 4})`` gives 16 for epochs 0-2, 8 for 3-5, then 4.
    """

    def __init__(self, milestones: Mapping[int, int]) -> None:
        if not isinstance(milestones, Mapping) or not milestones:
            raise TypeError(
                f"`milestones` must be a non-empty dict {{epoch: bits}} with epoch 0, got {milestones!r}"
            )
        parsed = {}
        for epoch, bits in milestones.items():
            # Keys from YAML or the command line may arrive as strings ("3").
            if isinstance(epoch, str) and epoch.strip().isdigit():
                epoch = int(epoch)
            parsed[_check_epoch(epoch, f"milestones epoch {epoch!r}")] = check_bitwidth(
                bits, f"milestones[{epoch}]"
            )
        if 0 not in parsed:
            raise ValueError(
                f"`milestones` must contain epoch 0 (the bits training starts with), got {dict(parsed)}"
            )
        self.milestones = dict(sorted(parsed.items()))

    @classmethod
    def from_percent(cls, milestones_percent: Mapping[int | str, int], epochs: int) -> StepBitwidth:
        """Milestones as percentages of a run of ``epochs`` epochs, rounded to the nearest
        epoch: ``StepBitwidth.from_percent({0: 16, 33: 8, 67: 4}, 30)`` is ``{0: 16, 10: 8, 20: 4}``.
        The config's schedules use this, so that they fit any ``trainer.max_epochs``
        (integer keys, so that one can be overridden: ``schedule.milestones_percent.67=2``)."""
        epochs = _check_epoch(epochs, "epochs")
        converted, sources = {}, {}
        for percent, bits in sorted(milestones_percent.items(), key=lambda item: float(item[0])):
            value = float(percent)
            if not 0 <= value < 100:
                raise ValueError(f"milestone percentages must lie in [0, 100), got {percent!r}")
            # The last epoch at the latest: in a short run a late milestone still happens.
            epoch = min(_round_half_up(value / 100 * epochs), max(epochs - 1, 0))
            if epoch in converted:  # two phases in one epoch: one of them would vanish
                raise ValueError(f"milestones {sources[epoch]:g}% and {value:g}% both fall on epoch {epoch} of a "
                                 f"{epochs}-epoch run, so the {converted[epoch]}-bit phase would disappear: use "
                                 "fewer milestones or a longer run")
            converted[epoch], sources[epoch] = bits, value
        return cls(converted)

    def bits_at(self, epoch: int) -> int:
        return self.milestones[max(e for e in self.milestones if e <= epoch)]

    def final_position(self) -> int:
        return max(self.milestones)


class LinearBitwidth(BitwidthSchedule):
    """From ``start_bits`` at ``start_epoch`` to ``end_bits`` at ``end_epoch``, rounded to int.

    Constant outside that interval. ``LinearBitwidth(16, 4, 0, 3)`` gives 16, 12, 8, 4.
    """

    def __init__(self, start_bits: int, end_bits: int, start_epoch: int = 0, end_epoch: int = 10) -> None:
        self.start_bits = check_bitwidth(start_bits, "start_bits")
        self.end_bits = check_bitwidth(end_bits, "end_bits")
        self.start_epoch = _check_epoch(start_epoch, "start_epoch")
        self.end_epoch = _check_epoch(end_epoch, "end_epoch")
        if self.end_epoch < self.start_epoch:
            raise ValueError(
                f"`end_epoch` ({self.end_epoch}) must be >= `start_epoch` ({self.start_epoch})"
            )

    def progress(self, epoch: int) -> float:
        """0 at start_epoch (and before), 1 at end_epoch (and after)."""
        if epoch >= self.end_epoch:
            return 1.0
        if epoch <= self.start_epoch:
            return 0.0
        return (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)

    def shape(self, t: float) -> float:
        return t

    def bits_at(self, epoch: int) -> int:
        t = self.shape(self.progress(epoch))
        return _round_half_up(self.start_bits + (self.end_bits - self.start_bits) * t)

    def final_position(self) -> int:
        return self.end_epoch


class CosineBitwidth(LinearBitwidth):
    """Like ``LinearBitwidth`` but along a half cosine: slow at both ends, fast in the middle."""

    def shape(self, t: float) -> float:
        return (1.0 - math.cos(math.pi * t)) / 2.0


class ListBitwidth(BitwidthSchedule):
    """Bits per epoch from a list; the last entry holds for every later epoch."""

    def __init__(self, bits: Sequence[int]) -> None:
        if len(bits) == 0:
            raise ValueError("a list schedule must hold at least one bitwidth, got []")
        self.bits = [check_bitwidth(b, f"schedule[{i}]") for i, b in enumerate(bits)]

    def bits_at(self, epoch: int) -> int:
        return self.bits[min(epoch, len(self.bits) - 1)]

    def final_position(self) -> int:
        return len(self.bits) - 1


class CallableBitwidth(BitwidthSchedule):
    """Any user callable ``epoch -> bits``, its answers checked when they are asked for."""

    def __init__(self, function: Callable[[int], int]) -> None:
        self.function = function

    def bits_at(self, epoch: int) -> int:
        return check_bitwidth(self.function(epoch), f"schedule({epoch})")


def final_position(schedule: BitwidthSchedule) -> int | None:
    """The first epoch (or step) from which the schedule gives its final bits for good, or
    None when that cannot be known (an arbitrary callable)."""
    method = getattr(schedule, "final_position", None)
    return method() if callable(method) else None


def epoch_at(percent: float, epochs: int) -> int:
    """``percent`` % of a run of ``epochs`` epochs, rounded to the nearest epoch (for configs:
    ``end_epoch: ${epoch_at:67,${trainer.max_epochs}}``)."""
    value = float(percent)
    if not 0 <= value <= 100:
        raise ValueError(f"an epoch percentage must lie in [0, 100], got {percent!r}")
    epochs = _check_epoch(epochs, "epochs")
    return min(_round_half_up(value / 100 * epochs), max(epochs - 1, 0))


def as_schedule(schedule: object) -> BitwidthSchedule:
    """Turn what a user may pass as a schedule into a ``BitwidthSchedule``.

    int -> constant; dict (or Hydra DictConfig) {epoch: bits} -> step; list (or ListConfig)
    -> bits per epoch; a schedule object or any callable ``epoch -> bits`` as it is.
    """
    if isinstance(schedule, BitwidthSchedule):
        return schedule
    if isinstance(schedule, numbers.Integral) and not isinstance(schedule, bool):
        return ConstantBitwidth(schedule)
    if isinstance(schedule, Mapping):
        return StepBitwidth(schedule)
    if isinstance(schedule, Sequence) and not isinstance(schedule, str):
        return ListBitwidth(schedule)
    if callable(schedule):
        wrapped = CallableBitwidth(schedule)
        wrapped(0)  # a callable that cannot answer for epoch 0 fails now, not mid-training
        return wrapped
    raise TypeError(
        "`schedule` must be an int, a dict {epoch: bits}, a list of bits per epoch, a schedule "
        f"object or a callable epoch -> bits, got {schedule!r} of type {type(schedule).__name__}"
    )


__all__ = [
    "BitwidthSchedule",
    "CallableBitwidth",
    "ConstantBitwidth",
    "CosineBitwidth",
    "LinearBitwidth",
    "ListBitwidth",
    "StepBitwidth",
    "as_schedule",
    "epoch_at",
    "final_position",
]
