"""QuantizationAwareTraining: bitwidth-annealed QAT for any LightningModule."""

from __future__ import annotations

import fnmatch
import math
import re
import numbers
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

import torchapprox as ta
from torchapprox.calibration import calibrate
from torchapprox.layers import find_layer_type, registered_types
from torchapprox.quantizers import ApproxQuantizer
from torchapprox.quantizers.minmax_quantizer import EVAL_RANGES, GRIDS
from torchapprox.validation import check_bool, check_overrides, check_patterns, check_range_gradient

from .schedules import BitwidthSchedule, as_schedule, final_position

STAT_NAMES = ("scale_factor", "mse", "sqnr_db")


class QuantizationAwareTraining(Callback):
    r"""Quantization-aware training whose bitwidth follows a schedule over the epochs.

    In ``setup()`` (on every rank, before DDP wraps the model and before a checkpoint is
    restored) a ``MinMaxQuant`` is attached to the weights and inputs of every layer of a
    registered type (Linear, Conv, ConvTranspose, Embedding, MultiheadAttention, RNN/LSTM/GRU,
    transformers' Conv1D, and any registered with ``torchapprox.register_layer``) of the
    LightningModule (see :func:`torchapprox.attach`). At the start of each training epoch every quantizer is
    set to ``schedule(current_epoch)``; validation and test run at that epoch's bitwidth.

    The float master weights stay the module's Parameters, so checkpoints hold exactly the
    plain model's keys: ``MyModel.load_from_checkpoint(path)`` works without this callback.
    The model stays quantized after ``fit``; to bake the grid values into the float weights
    call ``torchapprox.detach(model, bake=True)`` explicitly.

    Logged through the trainer's loggers every ``log_every_n_steps`` training steps, and
    only then (between logging steps the callback adds no work and no host-device sync):
    ``quant/bitwidth`` and, per quantized layer, ``quant/{layer}/{weight|input}/{scale_factor|mse|sqnr_db}``.
    Under DDP the weight statistics are the same on every rank (the weights are), while the
    input statistics describe each rank's own batch: they are averaged over the ranks before
    rank zero logs them. If a logged value is not finite, training stops with an error that
    names the layer and the step.

    Args:
        schedule: bits per epoch: an int (constant), a dict ``{epoch: bits}`` (must hold
            epoch 0), a list of bits per epoch, a schedule from :mod:`callbacks.schedules`,
            or any callable ``epoch -> bits``. Every bitwidth is an int in 2..32.
        quantize_weights: quantize every layer's weight.
        quantize_activations: quantize every layer's input.
        exclude: fnmatch patterns over qualified layer names to leave in float
            (e.g. ``["model.classifier"]``).
        log_every_n_steps: logging interval in training steps; ``None`` uses the trainer's
            ``log_every_n_steps``.
        log_histograms_every_n_steps: also write histograms of each weight and of its
            quantization error to TensorBoard at this (slower) interval; ``None`` for none.
        verbose: print on rank zero what is quantized (the share of the parameters, per
            layer type: see :func:`torchapprox.coverage`) and the bitwidth whenever it changes.
        bitwidth_overrides: ``{layer pattern: bits}`` kept whatever the schedule says (e.g.
            ``{"net.features.0": 8, "net.classifier": 8}``: first and last layer at 8 bits).
        activation_grid: the grid of the input quantizers (see :class:`torchapprox.MinMaxQuant`):
            ``"auto"`` (default: unsigned [0, 2^b - 1] for a non-negative input such as a
            ReLU's output, signed otherwise; chosen from the sweeps in the README's Results,
            where it turns 2-bit training from ~50% into ~97% accuracy), ``"signed"`` or
            ``"unsigned"``. Weights are always on the signed grid.
        recompute_inputs: True (default): layers keep their float input for backward and
            recompute its quantized value there (peak memory close to float training);
            False: they keep the quantized input too (a few percent faster per step, about
            a third more activation memory). See :func:`torchapprox.attach`.
        interval: ``"epoch"`` (default): the schedule is a function of the epoch, applied
            at each epoch start; ``"step"``: of the global step, applied at each step.
        bn_reestimate: when the bitwidth drops, reset every BatchNorm's running statistics
            and re-estimate them as a cumulative average until the end of the epoch, so that
            evaluation does not use statistics of the wider network.
        lr_rewarm_steps: when the bitwidth drops, ramp the learning rate linearly from
            1/N of its value back to it over these N steps (0: off). The ramp scales the
            rate around each optimizer step only, so LR schedulers see their own values.
        per_channel_weights: one scale per output channel of each weight instead of one per
            tensor (see :func:`torchapprox.attach`); logged scale factors are then the mean
            over the channels.
        range_gradient: let the gradient reach each quantizer's range (False, True,
            ``"weights"`` or ``"inputs"``; see :func:`torchapprox.attach`).
        eval_range: ``"batch"`` (each input's own range in evaluation too) or ``"running"``
            (a moving average of the training ranges; kept in this callback's checkpoint
            state). See :func:`torchapprox.attach`.
        calibrate_batches: at the end of the last training epoch, freeze every input
            quantizer's range to the min and max over this many training batches
            (:func:`torchapprox.calibrate`): the last validation, the checkpoints and the
            test then use constant input scales, as integer-only hardware and an exported
            QDQ graph do. 0 (default): dynamic scales throughout. The ranges are kept in this
            callback's checkpoint state. With no known last epoch (``max_epochs=-1``) the
            calibration runs when training ends, after the last checkpoint.
        per_token_inputs: one scale per token (row of the last dimension) of each input
            instead of one per tensor (see :func:`torchapprox.attach`).
        strict_schedule: when the run is too short for the schedule to reach its final
            bits (16 -> 4 over 20 epochs in a 10-epoch run), stop before training with an
            error (True; the app's setting) or warn and train anyway (False, the default:
            the run may be the first part of one resumed later).

    Bitwidth drops are logged as ``quant/transition`` (the new bits) at the step they happen.

    Raises:
        TypeError, ValueError: for a bad schedule or argument, at construction.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from callbacks import QuantizationAwareTraining
        >>> from callbacks.schedules import LinearBitwidth
        >>> qat = QuantizationAwareTraining(LinearBitwidth(16, 4, start_epoch=0, end_epoch=3))
        >>> trainer = Trainer(max_epochs=5, callbacks=[qat])   # 16, 12, 8, 4, 4 bits
    """

    def __init__(
        self,
        schedule: int | dict | BitwidthSchedule | Any = 8,
        *,
        quantize_weights: bool = True,
        quantize_activations: bool = True,
        exclude: str | Iterable[str] = (),
        log_every_n_steps: int | None = None,
        log_histograms_every_n_steps: int | None = None,
        verbose: bool = True,
        bitwidth_overrides: dict[str, int] | None = None,
        activation_grid: str = "auto",
        recompute_inputs: bool = True,
        interval: str = "epoch",
        bn_reestimate: bool = False,
        lr_rewarm_steps: int = 0,
        per_channel_weights: bool = False,
        range_gradient: bool | str = False,
        eval_range: str = "batch",
        calibrate_batches: int = 0,
        strict_schedule: bool = False,
        per_token_inputs: bool = False,
    ) -> None:
        self.schedule = as_schedule(schedule)
        self.quantize_weights = check_bool(quantize_weights, "quantize_weights")
        self.quantize_activations = check_bool(quantize_activations, "quantize_activations")
        if not (self.quantize_weights or self.quantize_activations):
            raise ValueError(
                "`quantize_weights` and `quantize_activations` are both False: nothing would be quantized"
            )
        self.exclude = check_patterns(exclude)
        self.log_every_n_steps = _check_interval(log_every_n_steps, "log_every_n_steps")
        self.log_histograms_every_n_steps = _check_interval(
            log_histograms_every_n_steps, "log_histograms_every_n_steps"
        )
        self.verbose = check_bool(verbose, "verbose")
        self.bitwidth_overrides = check_overrides(bitwidth_overrides)
        if activation_grid not in GRIDS:
            raise ValueError(f"`activation_grid` must be one of {', '.join(GRIDS)}, got {activation_grid!r}")
        self.activation_grid = activation_grid
        self.recompute_inputs = check_bool(recompute_inputs, "recompute_inputs")
        if interval not in ("epoch", "step"):
            raise ValueError(f"`interval` must be 'epoch' or 'step', got {interval!r}")
        self.interval = interval
        self.bn_reestimate = check_bool(bn_reestimate, "bn_reestimate")
        if isinstance(lr_rewarm_steps, bool) or not isinstance(lr_rewarm_steps, numbers.Integral) or lr_rewarm_steps < 0:
            raise ValueError(f"`lr_rewarm_steps` must be an int >= 0, got {lr_rewarm_steps!r}")
        self.lr_rewarm_steps = int(lr_rewarm_steps)
        self.per_channel_weights = check_bool(per_channel_weights, "per_channel_weights")
        self.range_gradient = check_range_gradient(range_gradient)
        if eval_range not in EVAL_RANGES:
            raise ValueError(f"`eval_range` must be one of {', '.join(EVAL_RANGES)}, got {eval_range!r}")
        self.eval_range = eval_range
        if isinstance(calibrate_batches, bool) or not isinstance(calibrate_batches, numbers.Integral) or calibrate_batches < 0:
            raise ValueError(f"`calibrate_batches` must be an int >= 0 (0: off), got {calibrate_batches!r}")
        self.calibrate_batches = int(calibrate_batches)
        self.strict_schedule = check_bool(strict_schedule, "strict_schedule")
        self.per_token_inputs = check_bool(per_token_inputs, "per_token_inputs")
        if self.per_token_inputs and self.calibrate_batches:
            raise ValueError(f"`calibrate_batches={self.calibrate_batches}` freezes one range per input tensor, but "
                             "`per_token_inputs=True` gives each token its own scale: use one of the two")
        # The epoch (or step, with interval="step") whose bitwidth the model runs at: saved in
        # checkpoints (a plain int), so that test(ckpt_path=...) evaluates at the bitwidth
        # the checkpoint was trained at.
        self.epoch: int | None = None
        self.bitwidth: int = self.schedule(0)
        self.quantized_layers: list[str] = []
        self._recording_step: int | None = None  # the global step whose statistics are being taken
        self._last_logged_step: int | None = None
        self._bn_momentum: dict[nn.Module, float | None] = {}  # BatchNorms re-estimating
        self._rewarm_start: int | None = None  # global step where the LR re-warm began
        self._unscaled_lrs: list[tuple[dict, float]] = []
        self._rewarm_factor: float | None = None
        self._calibrated = False
        self._rewarm_handles: list = []
        self._module: weakref.ref | None = None  # the LightningModule the quantizers sit on
        self._pending_quantizer_state: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- attach and schedule
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._check_schedule(trainer)
        if is_overridden("configure_model", pl_module, LightningModule) and not self._attached_to(pl_module):
            # Lightning builds those layers after setup(): attach right after it does, still
            # before DDP/FSDP wrap the model and before a checkpoint is restored.
            pl_module.configure_model = _ConfigureThenAttach(self, pl_module)
        else:
            self.attach(pl_module)

    def attach(self, pl_module: LightningModule) -> list[str]:
        """Put this callback's quantizers on ``pl_module`` (see :func:`torchapprox.attach`).

        Called by ``setup()``; a module this callback already quantized keeps its quantizers
        (and what they hold, such as running or frozen ranges) unless new layers appeared.
        Returns the quantized layers' names.
        """
        previous = self._module() if self._module is not None else None
        candidates = [name for name, layer in pl_module.named_modules()
                      if find_layer_type(layer) is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)]
        if previous is pl_module and ta.quantized_layers(pl_module) and set(candidates) <= set(self.quantized_layers):
            return self.quantized_layers
        kept = ta.quantizer_state(pl_module) if previous is pl_module else {}
        self.quantized_layers = ta.attach(
            pl_module,
            self.bitwidth,
            weights=self.quantize_weights,
            activations=self.quantize_activations,
            exclude=self.exclude,
            bitwidth_overrides=self.bitwidth_overrides,
            activation_grid=self.activation_grid,
            recompute_inputs=self.recompute_inputs,
            per_channel_weights=self.per_channel_weights,
            range_gradient=self.range_gradient,
            eval_range=self.eval_range,
            per_token_inputs=self.per_token_inputs,
        )
        if not self.quantized_layers:
            excluded = f" (exclude={list(self.exclude)})" if self.exclude else ""
            raise ValueError(
                f"{type(pl_module).__name__} has no layer to quantize{excluded}: QuantizationAwareTraining "
                f"quantizes {', '.join(registered_types())} and the types registered with torchapprox.register_layer"
            )
        self._module = weakref.ref(pl_module)
        state = {**kept, **self._pending_quantizer_state}
        self._pending_quantizer_state = {}
        known = {name for name, _ in _quantizer_buffer_names(pl_module)}
        ta.load_quantizer_state(pl_module, {k: v for k, v in state.items() if k in known})
        if self.verbose:
            rank_zero_info(f"QuantizationAwareTraining: {ta.coverage_summary(pl_module)}")
        return self.quantized_layers

    def _attached_to(self, pl_module: LightningModule) -> bool:
        return self._module is not None and self._module() is pl_module and bool(ta.quantized_layers(pl_module))

    def _ensure_attached(self, pl_module: LightningModule) -> None:
        # A configure_model() that Lightning did not call through the module (or not at
        # all): attach now rather than run in float.
        if not self._attached_to(pl_module):
            pl_module.__dict__.pop("configure_model", None)
            self.attach(pl_module)

    def _check_schedule(self, trainer: Trainer) -> None:
        """Every bitwidth of the run is valid, and the run lasts long enough for the schedule
        to reach its final bits: a short run must not report the wider start silently."""
        if self.interval == "epoch" and trainer.max_epochs is not None and trainer.max_epochs > 0:
            for epoch in range(trainer.max_epochs):  # any bad answer fails before training
                self.schedule(epoch)
            self._check_reaches_final_bits(trainer.max_epochs, "epoch", f"trainer.max_epochs={trainer.max_epochs}")

    def _check_reaches_final_bits(self, length: int, unit: str, limit: str) -> None:
        final = final_position(self.schedule)
        if final is not None and final > length - 1:
            message = (
                f"the bitwidth schedule {self.schedule!r} reaches its final {self.schedule(final)} bits at {unit} "
                f"{final}, but the run ends after {unit} {length - 1} ({limit}): lengthen the run or make the "
                "schedule end earlier (the config's schedules take fractions of the run)"
            )
            if self.strict_schedule:
                raise ValueError(message)
            rank_zero_warn(f"QuantizationAwareTraining: {message}")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.interval == "step":  # every step's bitwidth checked before the first step
            steps = trainer.estimated_stepping_batches
            if math.isfinite(steps):  # unbounded runs (max_epochs=-1 with max_time): no end to check
                for step in range(min(int(steps), 10**6)):
                    self.schedule(step)
                self._check_reaches_final_bits(int(steps), "step", f"{int(steps)} training steps")
        self._install_rewarm_hooks(trainer)
        self._calibrated = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_attached(pl_module)
        self._add_tensorboard_layout(trainer)

    def _add_tensorboard_layout(self, trainer: Trainer) -> None:
        """TensorBoard's custom-scalars view of the run: one chart per statistic with every
        layer in it (weights and inputs apart), the bitwidth, and each layer's scale factors
        in a chart of their own (their ranges differ by orders of magnitude between layers)."""
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or trainer.global_rank != 0:
            return
        every_layer = {f"{stat} of every layer, {kind}s": ["Multiline", [rf"quant/.*/{kind}/{stat}$"]]
                       for stat in ("sqnr_db", "mse") for kind in ("weight", "input")}
        every_layer["bitwidth"] = ["Multiline", [r"quant/bitwidth$", r"quant/transition$"]]
        per_layer = {layer: ["Multiline", [rf"quant/{re.escape(layer)}/(weight|input)/scale_factor$"]]
                     for layer in self.quantized_layers}
        layout = {"torchapprox: quantization error": every_layer, "torchapprox: scale factors": per_layer}
        for logger in loggers:
            logger.experiment.add_custom_scalars(layout)

    def _position(self, trainer: Trainer) -> int:
        return trainer.global_step if self.interval == "step" else trainer.current_epoch

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(self._position(trainer), trainer, pl_module)  # restored by now when resuming

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_bn_momentum()
        if self.interval == "epoch":
            self._apply(trainer.current_epoch, trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch >= trainer.max_epochs - 1
        if self.calibrate_batches and (last or trainer.should_stop):
            self._calibrate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_bn_momentum()
        self._remove_rewarm_hooks()
        if self.calibrate_batches and not self._calibrated:
            self._calibrate(trainer, pl_module)

    def _calibrate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device

        def forward(model, batch):
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            return model(inputs.to(device))

        ranges = calibrate(pl_module, trainer.train_dataloader, forward=forward, max_batches=self.calibrate_batches)
        self._calibrated = True
        if self.verbose:
            rank_zero_info(f"QuantizationAwareTraining: froze {len(ranges)} input ranges on "
                           f"{self.calibrate_batches} training batches (static scales from now on)")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_rewarm_hooks()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit":  # during fit the training loop has set the bitwidth
            self.on_test_start(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_attached(pl_module)
        self._apply(self.epoch if self.epoch is not None else self._position(trainer), trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_test_start(trainer, pl_module)

    def _apply(self, position: int, trainer: Trainer, pl_module: LightningModule) -> None:
        bitwidth = self.schedule(position)
        if bitwidth < self.bitwidth and trainer.training:
            self._on_bitwidth_drop(trainer, pl_module, bitwidth)
        if self.verbose and bitwidth != self.bitwidth:
            rank_zero_info(f"QuantizationAwareTraining: {self.interval} {position}, {self.bitwidth} -> {bitwidth} bits")
        self.epoch, self.bitwidth = position, bitwidth
        ta.set_bitwidth(pl_module, bitwidth)

    # ------------------------------------------------------------ bitwidth transitions
    def _on_bitwidth_drop(self, trainer: Trainer, pl_module: LightningModule, bitwidth: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"quant/transition": float(bitwidth)}, step=trainer.global_step)
        if self.bn_reestimate:
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                    module.reset_running_stats()
                    self._bn_momentum.setdefault(module, module.momentum)
                    module.momentum = None  # a cumulative average of every batch from now on
        if self.lr_rewarm_steps:
            self._rewarm_start = trainer.global_step

    def _restore_bn_momentum(self) -> None:
        for module, momentum in self._bn_momentum.items():
            module.momentum = momentum
        self._bn_momentum.clear()

    # The re-warm scales the learning rate only for the duration of each optimizer step,
    # through the optimizer's own step hooks: a scheduler that steps between two optimizer
    # steps sets the rate it wants, and the re-warm multiplies that.
    def _install_rewarm_hooks(self, trainer: Trainer) -> None:
        self._remove_rewarm_hooks()
        if not self.lr_rewarm_steps:
            return
        for optimizer in trainer.optimizers:
            self._rewarm_handles += [optimizer.register_step_pre_hook(self._rewarm_before_step),
                                     optimizer.register_step_post_hook(self._rewarm_after_step)]

    def _remove_rewarm_hooks(self) -> None:
        for handle in self._rewarm_handles:
            handle.remove()
        self._rewarm_handles = []
        self._unscaled_lrs.clear()

    def _update_rewarm_factor(self, trainer: Trainer) -> None:
        self._rewarm_factor = None
        if self._rewarm_start is None:
            return
        done = trainer.global_step - self._rewarm_start
        if done >= self.lr_rewarm_steps:
            self._rewarm_start = None
            return
        self._rewarm_factor = (done + 1) / self.lr_rewarm_steps

    def _rewarm_before_step(self, optimizer, args, kwargs) -> None:
        if self._rewarm_factor is None:
            return
        for group in optimizer.param_groups:
            self._unscaled_lrs.append((group, group["lr"]))
            group["lr"] = group["lr"] * self._rewarm_factor

    def _rewarm_after_step(self, optimizer, args, kwargs) -> None:
        for group, lr in self._unscaled_lrs:
            group["lr"] = lr
        self._unscaled_lrs.clear()

    # ------------------------------------------------------------------------ telemetry
    def _interval(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.interval == "step":
            if self.schedule(trainer.global_step) != self.bitwidth:
                self._apply(trainer.global_step, trainer, pl_module)
            else:  # unchanged: skip walking the model's modules on every step
                self.epoch = trainer.global_step
        self._update_rewarm_factor(trainer)
        step = trainer.global_step
        if trainer.loggers and step % self._interval(trainer) == 0 and step != self._last_logged_step:
            ta.enable_statistics(pl_module, True)
            self._recording_step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._recording_step
        if step is None:
            return
        ta.enable_statistics(pl_module, False)
        self._recording_step, self._last_logged_step = None, step
        metrics = self._collect(trainer, pl_module, step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        histogram_interval = self.log_histograms_every_n_steps
        if histogram_interval and step % histogram_interval == 0:
            self._log_histograms(trainer, pl_module, step)

    def _collect(self, trainer: Trainer, pl_module: LightningModule, step: int) -> dict[str, float]:
        tags, values = [], []
        for layer, kinds in ta.statistics(pl_module).items():
            for kind, stats in kinds.items():
                for stat in STAT_NAMES:
                    tags.append(f"quant/{layer}/{kind}/{stat}")
                    values.append(stats[stat])
        if not values:
            return {"quant/bitwidth": float(self.bitwidth)}
        stacked = torch.stack(values)
        # One collective for all statistics: input statistics differ per rank (own batch).
        stacked = trainer.strategy.reduce(stacked, reduce_op="mean")
        host = stacked.tolist()  # the one host-device sync, on logging steps only
        metrics = dict(zip(tags, host))
        for tag, value in metrics.items():
            if not math.isfinite(value):
                layer = tag.split("/")[1:-2]
                raise RuntimeError(
                    f"QuantizationAwareTraining: {tag} is {value} at step {step} "
                    f"(layer {'/'.join(layer)!r}): training diverged. Lower the learning rate, "
                    "raise the bitwidth or exclude the layer."
                )
        metrics["quant/bitwidth"] = float(self.bitwidth)
        return metrics

    @torch.no_grad()
    def _log_histograms(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or trainer.global_rank != 0:
            return
        for layer_name, layer in ta.quantized_layers(pl_module).items():
            quantizer = getattr(layer, "weight_quantizer", None)
            weight = getattr(layer, "weight", None)
            if quantizer is None or weight is None:
                continue
            error = quantizer.fake_quantize_with_scale(weight)[0] - weight
            for logger in loggers:
                logger.experiment.add_histogram(f"quant/{layer_name}/weight/values", weight, step)
                logger.experiment.add_histogram(f"quant/{layer_name}/weight/error", error, step)

    def __getstate__(self) -> dict[str, Any]:
        # A weak reference and hook handles cannot be pickled (ddp_spawn pickles callbacks):
        # setup() finds the module again in the new process, on_train_start the optimizers.
        return {**self.__dict__, "_module": None, "_rewarm_handles": []}

    # --------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        # Plain Python types and tensors only: checkpoints must load under
        # torch.load(weights_only=True). The quantizers' own tensors (running ranges) live
        # here, not in the model's state dict, which keeps the plain model's keys.
        module = self._module() if self._module is not None else None
        tensors = {k: v.cpu() for k, v in ta.quantizer_state(module).items()} if module is not None else {}
        return {"epoch": self.epoch, "bitwidth": int(self.bitwidth), "quantizer_state": tensors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = state_dict.get("epoch")
        self.bitwidth = state_dict.get("bitwidth", self.bitwidth)
        tensors = dict(state_dict.get("quantizer_state") or {})
        module = self._module() if self._module is not None else None
        if module is not None and ta.quantized_layers(module):
            ta.load_quantizer_state(module, tensors)  # restored after setup() attached
        else:
            self._pending_quantizer_state = tensors


def _check_interval(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be None or an int >= 1 (training steps), got {value!r}")
    return int(value)


class _ConfigureThenAttach:
    """Stands in for a LightningModule's ``configure_model`` for one call: runs the module's
    own, then attaches the callback's quantizers to the layers it built. A class, not a
    closure, so that the module stays picklable."""

    def __init__(self, callback: QuantizationAwareTraining, pl_module: LightningModule) -> None:
        self.callback, self.module = callback, pl_module
        # What Lightning's is_overridden() looks at: the module's own method, unbound.
        self.__wrapped__ = type(pl_module).configure_model

    def __call__(self) -> None:
        del self.module.configure_model  # the class's method again from now on
        self.module.configure_model()
        self.callback.attach(self.module)


def _quantizer_buffer_names(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, ApproxQuantizer):
            for buffer_name in module._buffers:
                yield (f"{name}.{buffer_name}" if name else buffer_name), module
