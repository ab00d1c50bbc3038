"""LearningRateRewarm: ramp the learning rate back after a bitwidth drop."""

from __future__ import annotations

import numbers
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class LearningRateRewarm(Callback):
    """When the bitwidth drops, ramp the learning rate linearly from ``1/steps`` of its
    value back to it over ``steps`` optimizer steps.

    It reacts to :class:`~callbacks.QuantizationAwareTraining`'s bitwidth changes (any
    callback with ``on_bitwidth_change`` hears them). The ramp scales the rate only for the
    duration of each optimizer step, through the optimizer's own step hooks, so a scheduler
    that steps in between sets the rate it wants and the ramp multiplies that (as
    Lightning's ``StochasticWeightAveraging`` leaves schedulers their own values). Where the
    ramp stands is saved in checkpoints: a run resumed mid-ramp goes on as the uninterrupted
    one.

    Args:
        steps: length of the ramp in optimizer steps, an int >= 1.

    Example::

        Trainer(callbacks=[QuantizationAwareTraining({0: 8, 10: 4}), LearningRateRewarm(100)])
    """

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"`steps` must be an int >= 1 (optimizer steps), got {steps!r}")
        self.steps = int(steps)
        self._start: int | None = None  # global step where the ramp began
        self._factor: float | None = None
        self._handles: list = []
        self._unscaled: list[tuple[dict, float]] = []

    def on_bitwidth_change(self, trainer: Trainer, pl_module: LightningModule, old: int, new: int) -> None:
        if new < old and trainer.training:
            self._start = trainer.global_step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._handles += [optimizer.register_step_pre_hook(self._before_step),
                              optimizer.register_step_post_hook(self._after_step)]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._factor = None
        if self._start is None:
            return
        done = trainer.global_step - self._start
        if done >= self.steps:
            self._start = None
            return
        self._factor = (done + 1) / self.steps

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._factor is None:
            return
        for group in optimizer.param_groups:
            self._unscaled.append((group, group["lr"]))
            group["lr"] = group["lr"] * self._factor

    def _after_step(self, optimizer, args, kwargs) -> None:
        for group, lr in self._unscaled:
            group["lr"] = lr
        self._unscaled.clear()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unscaled.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"start": self._start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        start = state_dict.get("start")
        self._start = None if start is None else int(start)

    def __getstate__(self) -> dict[str, Any]:
        # Hook handles cannot be pickled (ddp_spawn pickles callbacks): on_train_start makes them.
        return {**self.__dict__, "_handles": [], "_unscaled": []}
