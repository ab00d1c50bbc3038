"""Per-layer bitwidths under a budget, chosen during training: ``MixedPrecision``.

Put it after :class:`~callbacks.QuantizationAwareTraining`. The run trains at the schedule's
precision (8 bits, say) until ``at_epoch``; then this callback measures each layer's
sensitivity on ``batches`` training batches (``ta.sensitivity``), assigns per-layer bits
within the budget (``ta.assign_bitwidths``), and sets every layer's weight and input
quantizers to its bits, pinned (the schedule leaves them there from then on). It prints the
assignment, logs ``quant/{layer}/bits`` and ``precision/{average_bits, size_bytes,
bit_operations}``, and keeps the assignment in its checkpoint state: a resumed run keeps it
(and a run resumed before ``at_epoch`` assigns when it gets there).

``method="uniform"`` gives every layer the largest of ``choices`` within the budget: the
baseline an assignment is compared with, through the same flow.

Under DDP every rank measures on its own batches and rank 0's assignment is broadcast, so
every rank trains the same one.
"""

from __future__ import annotations

import itertools
import numbers
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info

import torchapprox as ta
from torchapprox.assignment import COSTS, Assignment, uniform_bitwidths
from torchapprox.layers.functional import quantizer_of
from torchapprox.qat import quantized_tensor_names
from torchapprox.precision import count_macs
from torchapprox.sensitivity import (METHODS, Sensitivity, batch_size, group_macs, layer_groups,
                                     preserved_random_state)

CALLBACK_METHODS = (*METHODS, "uniform")


def cross_entropy(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: cross-entropy of ``model(x)`` against ``y`` for ``(x, y)`` batches,
    over the last dimension of the logits (classifiers [B, C]; language models [B, T, V])."""
    x, y = batch[0], batch[1]
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class MixedPrecision(Callback):
    """Assign per-layer bitwidths within ``budget`` at epoch ``at_epoch`` (module docstring).

    Args:
        budget: the largest cost: average weight bits (``cost="weights"``), bytes of the
            quantized weights (``"bytes"``) or bit-operations per sample (``"bit_operations"``).
        cost: ``"weights"``, ``"bytes"`` or ``"bit_operations"``.
        choices: the candidate bitwidths.
        method: ``"hessian"``, ``"direct"`` (``ta.sensitivity``) or ``"uniform"``.
        at_epoch: the epoch (0-based) from which the assigned bits train; the epochs before
            run at the schedule's precision.
        batches: training batches the sensitivity is measured on.
        samples: Hutchinson samples per batch (``"hessian"``).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default :func:`cross_entropy`.
        verbose: print the assignment.
    """

    def __init__(self, budget: float, cost: str = "weights", choices: Sequence[int] = (2, 3, 4, 8),
                 method: str = "hessian", at_epoch: int = 1, batches: int = 4, samples: int = 4,
                 loss_fn: Callable | None = None, verbose: bool = True) -> None:
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not budget > 0:
            raise ValueError(f"`budget` must be a positive number, got {budget!r}")
        if cost not in COSTS:
            raise ValueError(f"`cost` must be one of {', '.join(map(repr, COSTS))}, got {cost!r}")
        if method not in CALLBACK_METHODS:
            raise ValueError(f"`method` must be one of {', '.join(map(repr, CALLBACK_METHODS))}, got {method!r}")
        for name, value, low in (("at_epoch", at_epoch, 0), ("batches", batches, 1), ("samples", samples, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        from torchapprox.assignment import _check_choices

        self.budget, self.cost, self.choices = float(budget), cost, _check_choices(choices)
        self.method, self.at_epoch, self.batches, self.samples = method, int(at_epoch), int(batches), int(samples)
        self.loss_fn = loss_fn or cross_entropy
        self.verbose = verbose
        self.assignment: Assignment | None = None
        self.sensitivity: Sensitivity | None = None
        self._pending: dict[str, Any] | None = None
        self._module = None

    # ------------------------------------------------------------------------ the assignment
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = weakref.ref(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install_pending(pl_module)
        last = trainer.max_epochs
        if self.assignment is None and last is not None and last >= 0 and self.at_epoch >= last:
            raise ValueError(f"MixedPrecision: `at_epoch` {self.at_epoch} is not before the run's end "
                             f"(max_epochs={last}), so no epoch would train the assignment: use at most {last - 1}")
        if self.assignment is None and self.cost != "bit_operations":
            self._check_feasible(pl_module)  # before training, not at at_epoch

    def _check_feasible(self, pl_module: LightningModule) -> None:
        """ValueError (with the smallest feasible budget) for a budget no assignment meets;
        bit-operations need a counted forward pass and are checked at the assignment."""
        _, params = layer_groups(ta.quantized_layers(pl_module))
        uniform_bitwidths(params, {}, self.budget, self.choices, self.cost)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install_pending(pl_module)

    def _install_pending(self, pl_module: LightningModule | None) -> None:
        """A checkpoint's assignment, pinned on the quantizers as soon as they exist (the
        quantization callback has restored their bits by then), so that the schedule, which
        sets only unpinned quantizers, never moves them."""
        if self._pending is None or pl_module is None or not ta.quantized_layers(pl_module):
            return
        saved, self._pending = self._pending, None
        self.assignment = Assignment(**saved["assignment"])
        self.sensitivity = None if saved.get("sensitivity") is None else Sensitivity.from_dict(saved["sensitivity"])
        self._apply(pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.assignment is None and trainer.current_epoch >= self.at_epoch:
            self._assign(trainer, pl_module)
            self._apply(pl_module)
            self._report(trainer, pl_module)

    def _assign(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batches = [move_data_to_device(batch, pl_module.device)
                   for batch in itertools.islice(iter(trainer.train_dataloader), self.batches)]
        if self.method == "uniform":
            layers = ta.quantized_layers(pl_module)
            groups, params = layer_groups(layers)
            with torch.no_grad(), preserved_random_state(pl_module):
                macs = group_macs(groups, count_macs(pl_module, layers, lambda: self.loss_fn(pl_module, batches[0]),
                                                     batch_size(batches[0])))
            assignment = uniform_bitwidths(params, macs, self.budget, self.choices, self.cost, groups)
        else:
            self.sensitivity = ta.sensitivity(pl_module, batches, self.loss_fn, self.choices, method=self.method,
                                              samples=self.samples)
            assignment = ta.assign_bitwidths(self.sensitivity, self.budget, self.choices, self.cost)
        # every rank trains rank 0's assignment
        self.assignment = trainer.strategy.broadcast(assignment, src=0)

    def _apply(self, pl_module: LightningModule) -> None:
        layers = ta.quantized_layers(pl_module)
        for name, bits in self.assignment.layer_bits().items():
            if name not in layers:
                raise ValueError(f"MixedPrecision: the assignment names layer {name!r}, which the model does not "
                                 "quantize")
            weights, inputs = quantized_tensor_names(layers[name])
            for tensor in (*weights, *inputs):
                quantizer = quantizer_of(layers[name], tensor)
                if quantizer is not None:
                    quantizer.bitwidth = bits
                    quantizer.pinned = True

    def _report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.verbose:
            rank_zero_info(f"MixedPrecision: epoch {trainer.current_epoch}, {self.method} assignment\n"
                           f"{self.assignment.table()}")
        metrics = {f"quant/{layer}/bits": float(bits) for layer, bits in self.assignment.layer_bits().items()}
        metrics[f"precision/assigned_{self.assignment.cost_kind}"] = float(self.assignment.cost)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain values: the assignment (bits per layer, cost, budget) and the sensitivity it
        came from, or None before ``at_epoch``."""
        if self.assignment is None:
            return {"assignment": None if self._pending is None else self._pending["assignment"],
                    "sensitivity": None if self._pending is None else self._pending.get("sensitivity")}
        a = self.assignment
        return {"assignment": {"bits": dict(a.bits), "cost": float(a.cost), "budget": float(a.budget),
                               "cost_kind": a.cost_kind, "sensitivity": float(a.sensitivity),
                               "groups": {k: list(m) for k, m in a.groups.items()}},
                "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.assignment, self.sensitivity = None, None
        self._pending = dict(state_dict) if state_dict.get("assignment") else None
        self._install_pending(self._module() if self._module is not None else None)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_module": None}
