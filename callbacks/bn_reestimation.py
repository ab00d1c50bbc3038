"""BatchNormReestimation: re-estimate BatchNorm statistics after a bitwidth drop."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn


# Every normalisation layer that keeps running statistics (their Lazy and user subclasses too).
NORMALIZATION_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                       nn.InstanceNorm2d, nn.InstanceNorm3d)


class BatchNormReestimation(Callback):
    """When the bitwidth drops, restart the running statistics of every normalisation layer
    that is training (BatchNorm, SyncBatchNorm, InstanceNorm with ``track_running_stats``),
    and re-estimate them as a cumulative average over the rest of that epoch, so
    that evaluation does not use statistics of the wider network.

    It reacts to :class:`~callbacks.QuantizationAwareTraining`'s bitwidth changes (any
    callback with ``on_bitwidth_change`` hears them). The reset happens at the first
    training batch of the new bitwidth, after every epoch-start hook has run, and leaves
    alone a normalisation layer that is not in training mode then (the usual fine-tuning
    freeze: ``bn.eval()``) or keeps no running statistics. Its state (the layers being
    re-estimated) is saved in checkpoints, so a run resumed mid-epoch goes on averaging.

    Example::

        Trainer(callbacks=[QuantizationAwareTraining({0: 8, 10: 4}), BatchNormReestimation()])
    """

    def __init__(self) -> None:
        self._pending = False  # a drop happened; the reset waits for the first batch
        self._momentum: dict[str, float | None] = {}  # layers re-estimating -> their own momentum
        self._module: LightningModule | None = None

    def on_bitwidth_change(self, trainer: Trainer, pl_module: LightningModule, old: int, new: int) -> None:
        if new < old and trainer.training:
            self._pending = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._module = pl_module
        if not self._pending:
            return
        self._pending = False
        self._restore()
        for name, module in pl_module.named_modules():
            if isinstance(module, NORMALIZATION_TYPES) and module.track_running_stats and module.training:
                module.reset_running_stats()
                self._momentum[name] = module.momentum
                module.momentum = None  # a cumulative average of every batch from now on

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._module is not None:
            modules = dict(self._module.named_modules())
            for name, momentum in self._momentum.items():
                if name in modules:
                    modules[name].momentum = momentum
        self._momentum.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self._pending, "momentum": dict(self._momentum)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = bool(state_dict.get("pending", False))
        self._momentum = dict(state_dict.get("momentum", {}))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = pl_module

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Resumed mid re-estimation: the layers average cumulatively again.
        modules = dict(pl_module.named_modules())
        for name in self._momentum:
            if name in modules:
                modules[name].momentum = None
