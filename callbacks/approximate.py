"""Approximation-aware retraining: switch layers to an approximate multiplier at an epoch.

The standard flow for approximate hardware: train with exact products (quantization-aware
training), then let the layers multiply through the approximate multiplier and retrain a few
epochs so the network recovers the accuracy the multiplier costs. Put this callback after
:class:`~callbacks.QuantizationAwareTraining` (which attaches the quantizers):

    Trainer(callbacks=[QuantizationAwareTraining(schedule=ConstantBitwidth(8)),
                       ApproximateProducts(drum(4), start_epoch=5)])

While the quantization callback records statistics (every ``log_every_n_steps``), each
approximate layer also logs ``approx/{layer}/error_std``: the standard deviation of the error
the multiplier adds to the layer's integer output, relative to that of the exact output. The
assignment is kept in the checkpoint (this callback's state), so a resumed run computes with
the same multipliers, and a run resumed before ``start_epoch`` switches when it gets there.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Iterable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import torchapprox as ta
from torchapprox.approximation import install_multipliers, multiplier_state, multipliers_from_state
from torchapprox.multipliers import Multiplier
from torchapprox.multipliers.functional import GRADIENTS
from torchapprox.validation import check_bool, check_patterns


class ApproximateProducts(Callback):
    """Compute the products of the quantized layers matching ``pattern`` with ``multiplier``
    from epoch ``start_epoch`` on.

    Args:
        multiplier: a :class:`torchapprox.multipliers.Multiplier` (``drum(4)``,
            ``Multiplier.from_table(path)``, ...).
        start_epoch: the first epoch (0-based) that trains with approximate products; 0
            (default) from the start; validation and test after it use them too. Set to
            ``max_epochs``, the run trains exactly and its test measures the multiplier
            dropped into the trained model (no retraining).
        pattern: fnmatch pattern(s) over layer names (default every layer that can take one).
        gradient: ``"ste"`` (the exact product's gradient) or ``"table"`` (the table's slopes).
        verbose: print the switch.

    Raises:
        TypeError, ValueError: a bad argument (named); at the switch, the errors of
            :func:`torchapprox.set_multiplier` (operands over 8 bits: let the bitwidth schedule
            reach 8 bits or fewer by ``start_epoch``).
    """

    def __init__(self, multiplier: Multiplier, start_epoch: int = 0, pattern: str | Iterable[str] = "*",
                 gradient: str = "ste", verbose: bool = True) -> None:
        if not isinstance(multiplier, Multiplier):
            raise TypeError(f"`multiplier` must be a torchapprox.multipliers.Multiplier, got {type(multiplier).__name__}")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, numbers.Integral) or start_epoch < 0:
            raise ValueError(f"`start_epoch` must be an int >= 0, got {start_epoch!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"`gradient` must be one of {', '.join(map(repr, GRADIENTS))}, got {gradient!r}")
        self.multiplier = multiplier
        self.start_epoch = int(start_epoch)
        self.pattern = check_patterns(pattern, "pattern")
        self.gradient = gradient
        self.verbose = check_bool(verbose, "verbose")
        self.layers: list[str] = []  # the layers switched
        self._saved: dict[str, Any] | None = None  # an assignment from a checkpoint, not installed yet

    # --------------------------------------------------------------------------- the switch
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch_when_due(trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        last = trainer.max_epochs
        if last is not None and last >= 0 and self.start_epoch > last:
            raise ValueError(f"ApproximateProducts: `start_epoch` {self.start_epoch} is after the run's end "
                             f"(max_epochs={last}), so no product would go through the multiplier: use at most "
                             f"{last} ({last} = test the trained model with it)")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch_when_due(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch_when_due(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._switch_when_due(trainer, pl_module)

    def _switch_when_due(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Switch once ``start_epoch`` is reached. After fitting, ``trainer.current_epoch`` is
        ``max_epochs``: ``start_epoch=max_epochs`` trains with exact products and tests the
        trained model with the multiplier (its accuracy before any retraining)."""
        self._restore(pl_module)
        if self.layers or trainer.current_epoch < self.start_epoch or not ta.quantized_layers(pl_module):
            return
        self.layers = self._switch(trainer, pl_module)

    def _switch(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        """Put the multipliers on the layers; returns the layers switched."""
        layers = ta.set_multiplier(pl_module, self.multiplier, self.pattern, gradient=self.gradient)
        if self.verbose:
            rank_zero_info(f"ApproximateProducts: epoch {trainer.current_epoch}, {len(layers)} layers multiply "
                           f"with {self.multiplier.name!r} from now on")
        return layers

    def _configured_names(self) -> list[str]:
        return [self.multiplier.name]

    def _restore(self, pl_module: LightningModule) -> None:
        """Install a checkpoint's assignment once the quantizers are attached (the quantization
        callback restores them first; attaching again would clear the multipliers)."""
        if self._saved is None or not ta.quantized_layers(pl_module):
            return
        saved, self._saved = self._saved, None
        names = sorted({entry["name"] for entry in saved.values()})
        if not set(names) <= set(self._configured_names()):
            rank_zero_warn(f"{type(self).__name__}: the checkpoint's layers multiply with {', '.join(names)}, which "
                           f"this run keeps (it was given {', '.join(self._configured_names())}): a resumed run computes "
                           "as it trained")
        install_multipliers(pl_module, multipliers_from_state(pl_module, saved))
        self.layers = list(saved)

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"start_epoch", "layers", "assignment"}``: plain values and tensors (loads with
        ``torch.load(weights_only=True)``); the assignment as
        :func:`torchapprox.approximation.multiplier_state` records it."""
        return {"start_epoch": self.start_epoch, "layers": list(self.layers), "assignment": self._assignment}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        assignment = state_dict.get("assignment") or {}
        self._saved = dict(assignment) if assignment else None
        self.layers = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = weakref.ref(pl_module)

    @property
    def _assignment(self) -> dict[str, Any]:
        reference = getattr(self, "_module", None)
        module = reference() if reference is not None else None
        if self._saved is not None:
            return self._saved
        return multiplier_state(module) if module is not None and self.layers else {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_module": None}


def error_rate(model, batch: Any):
    """The fraction of ``(x, y)`` samples whose argmax of ``model(x)`` is not ``y`` (the
    accuracy a multiplier costs, which a loss can hide: a multiplier that shrinks the logits
    may lower the cross-entropy of an overconfident model while it loses accuracy)."""
    import torch

    x, y = batch[0], batch[1]
    logits = model(x)
    return (logits.reshape(-1, logits.shape[-1]).argmax(-1) != y.reshape(-1)).to(torch.float32).mean()


class OutputDivergence:
    """``loss_fn(model, batch)``: the KL divergence (nats per sample, or per token) of the
    model's output distribution from the one the reference model gave on the same batch
    (``batches``, kept by identity). A multiplier's effect on what the network predicts, which
    neither the training error (zero on a fitted model) nor the loss (a multiplier that
    shrinks the logits can lower it) measures."""

    def __init__(self, model, batches: list) -> None:
        import torch

        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.reference = {id(batch): self._log_probabilities(model, batch) for batch in batches}
        model.train(was_training)

    @staticmethod
    def _log_probabilities(model, batch):
        import torch.nn.functional as F

        logits = model(batch[0] if isinstance(batch, (tuple, list)) else batch)
        return F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)

    def __call__(self, model, batch):
        import torch.nn.functional as F

        return F.kl_div(self._log_probabilities(model, batch), self.reference[id(batch)], log_target=True,
                        reduction="batchmean")


class AssignMultipliers(ApproximateProducts):
    """At ``start_epoch``, choose a multiplier per layer among ``candidates``
    (``ta.multiplier_sensitivity`` on ``batches`` training batches, then
    ``ta.assign_multipliers``): within ``budget`` (a fraction of the cost of exact products
    everywhere, e.g. 0.5) with the least summed increase of ``loss_fn``, or the cheapest within
    ``max_loss_increase``. ``loss_fn`` defaults to :class:`OutputDivergence` (how far each
    choice moves the model's predictions, in nats); :func:`error_rate` (with
    ``max_loss_increase=0.01``: one point) is the other built-in. Then as :class:`ApproximateProducts`: retraining with them, telemetry, the
    assignment in the checkpoint. Under DDP rank 0's assignment is broadcast.

    Raises:
        TypeError, ValueError: bad arguments (named), as for ``ta.assign_multipliers``.
    """

    def __init__(self, candidates: list[Multiplier], budget: float | None = None, max_loss_increase: float | None = None,
                 start_epoch: int = 0, batches: int = 8, loss_fn=None, gradient: str = "ste",
                 verbose: bool = True) -> None:
        candidates = list(candidates)
        if not candidates or not all(isinstance(m, Multiplier) for m in candidates):
            raise TypeError("`candidates` must be a non-empty list of torchapprox.multipliers.Multiplier")
        if (budget is None) == (max_loss_increase is None):
            raise ValueError("give exactly one of `budget` (a fraction of the exact products' cost) and "
                             "`max_loss_increase`")
        if isinstance(batches, bool) or not isinstance(batches, numbers.Integral) or batches < 1:
            raise ValueError(f"`batches` must be an int >= 1, got {batches!r}")
        super().__init__(candidates[0], start_epoch=start_epoch, gradient=gradient, verbose=verbose)
        self.candidates, self.budget, self.max_loss_increase = candidates, budget, max_loss_increase
        self.batches, self.loss_fn = int(batches), loss_fn

    def _configured_names(self) -> list[str]:
        return [m.name for m in self.candidates]

    def _switch(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        import itertools

        from lightning.pytorch.utilities import move_data_to_device

        loader = trainer.train_dataloader
        if loader is None and trainer.datamodule is not None:  # after fitting: the test switches
            loader = trainer.datamodule.train_dataloader()
        if loader is None:
            raise ValueError("AssignMultipliers: no training data to measure the multipliers' sensitivity on "
                             "(the trainer has no train dataloader)")
        batches = [move_data_to_device(batch, pl_module.device) for batch in itertools.islice(iter(loader),
                                                                                              self.batches)]
        loss_fn = self.loss_fn or OutputDivergence(pl_module, batches)
        sensitivity = ta.multiplier_sensitivity(pl_module, batches, loss_fn, self.candidates)
        assignment = ta.assign_multipliers(sensitivity, self.budget, max_loss_increase=self.max_loss_increase)
        assignment = trainer.strategy.broadcast(assignment, src=0)
        assignment.apply(pl_module, gradient=self.gradient)
        if self.verbose:
            rank_zero_info(f"AssignMultipliers: epoch {trainer.current_epoch}\n{assignment.table()}")
        for logger in trainer.loggers:
            logger.log_metrics({"approx/cost": float(assignment.cost)}, step=trainer.global_step)
        return list(assignment.multipliers)
