"""QuantizationAwareTraining: bitwidth-annealed QAT for any LightningModule.

Its jobs, and only these: attach the quantizers the specs describe when the model's layers
exist, set the schedule's bitwidth, log per-layer scale factors and quantization error, keep
its state in checkpoints (and freeze static input scales when asked to). Batch-norm
re-estimation and the learning-rate re-warm are callbacks of their own
(``callbacks.bn_reestimation``, ``callbacks.lr_rewarm``) that hear its bitwidth changes.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

import torchapprox as ta
from torchapprox import batchnorm_fold
from torchapprox.calibration import calibrate
from torchapprox.layers import find_layer_type, registered_types
from torchapprox.layers.builtin import quantizable_pooling
from torchapprox.shortcuts import apply_shortcuts
from torchapprox.qat import quantized_tensor_names
from torchapprox.quantizers.registry import quantizer_class
from torchapprox.spec import QuantSpec, as_spec, check_rules, resolve
from torchapprox.statistics import STAT_NAMES, StatisticsCollector
from torchapprox.validation import check_bool, check_patterns

from .bn_reestimation import BatchNormReestimation
from .distributed import all_reduce_function
from .lr_rewarm import LearningRateRewarm
from .schedules import BitwidthSchedule, as_schedule, final_position

# The callback's default input spec: non-negative inputs on the unsigned grid (the README's
# Results: it turns 2-bit training from ~50% into ~97% accuracy on the digits).
DEFAULT_INPUT = QuantSpec(grid="auto")
STATE_KEYS = ("epoch", "bitwidth", "quantization", "calibrated", "companions")


class QuantizationAwareTraining(Callback):
    r"""Quantization-aware training whose bitwidth follows a schedule over the epochs.

    In ``setup()`` (on every rank, before DDP wraps the model and before a checkpoint is
    restored) quantizers are attached to the weights and inputs of every layer of a
    registered type (Linear, Conv, ConvTranspose, Embedding, MultiheadAttention,
    RNN/LSTM/GRU, transformers' Conv1D, and any registered with ``torchapprox.register_layer``)
    of the LightningModule, as the ``weight`` and ``input`` specs and the ``rules`` say (see
    :func:`torchapprox.attach`). At the start of each training epoch every quantizer not
    pinned by a rule is set to ``schedule(current_epoch)``; validation and test run at that
    epoch's bitwidth.

    The float master weights stay the module's Parameters, so checkpoints hold exactly the
    plain model's keys (plus learned steps, for families that learn them):
    ``MyModel.load_from_checkpoint(path)`` works without this callback, and
    :func:`callbacks.restore_quantized` rebuilds the quantized model from a checkpoint. The
    model stays quantized after ``fit``; to bake the grid values into the float weights call
    ``torchapprox.detach(model, bake=True)`` explicitly.

    Logged through the trainer's loggers every ``log_every_n_steps`` training steps, and
    only then (between logging steps the callback adds no work and no host-device sync):
    ``quant/bitwidth`` and, per quantized layer, ``quant/{layer}/{weight|input}/{scale_factor|mse|sqnr_db}``,
    from a statistics collector opened for that step (a layer that did not run reports
    nothing). Under DDP each value is the mean over the ranks where the layer ran. If a
    logged value is not finite, training stops with an error naming the layer and the step.

    Args:
        schedule: bits per epoch: an int (constant), a dict ``{epoch: bits}`` (must hold
            epoch 0), a list of bits per epoch, a schedule from :mod:`callbacks.schedules`,
            or any callable ``epoch -> bits``. Every bitwidth is an int in 2..32.
        weight: the :class:`torchapprox.QuantSpec` of every weight (or a dict of its fields);
            default ``QuantSpec()`` (min/max, signed, per tensor).
        input: the spec of every input; default ``QuantSpec(grid="auto")`` (non-negative
            inputs, such as a ReLU's output, on the unsigned grid).
        rules: ``{layer pattern: {field: value}}``, per-layer changes of the specs; a rule
            that sets ``bits`` pins those layers whatever the schedule says (first and last
            layer at 8 bits: ``{"net.features.0": {"bits": 8}, "net.classifier": {"bits": 8}}``).
        quantize_weights, quantize_activations: quantize weights, inputs (False: not at all).
        exclude: fnmatch patterns over qualified layer names to leave in float.
        log_every_n_steps: logging interval in training steps; ``None`` uses the trainer's.
        log_histograms_every_n_steps: also write histograms of each weight and of its
            quantization error to TensorBoard at this (slower) interval; ``None`` for none.
        verbose: print on rank zero what is quantized (the share of the parameters, per
            layer type) and the bitwidth whenever it changes.
        interval: ``"epoch"`` (default): the schedule is a function of the epoch, applied at
            each epoch start; ``"step"``: of the global step, applied at each step.
        calibrate_batches: freeze every input quantizer's range to the min and max over this
            many training batches (:func:`torchapprox.calibrate`) after the last training
            batch, before the last validation: that validation, the checkpoints and the test
            use constant input scales, as integer-only hardware and an exported QDQ graph do.
            0 (default): dynamic scales throughout. The ranges are kept in this callback's
            checkpoint state. When training ends early (early stopping, ``max_time``) the
            calibration runs when it ends, after the last validation.
        quantize_pooling: also quantize the inputs of pooling layers (see
            :func:`torchapprox.attach`): a convolution before pooling then has a quantized
            output, which ONNX Runtime runs as an integer kernel.
        freeze_batchnorm: with ``weight.fold_batchnorm``, the fraction of the training
            epochs after which the folded BatchNorm statistics freeze (training then uses
            the running statistics, exactly the exported folded layer; Jacob et al. 2018),
            a number in [0, 1]; None (default): never.
        strict_schedule: when the run is too short for the schedule to reach its final
            bits, stop before training with an error (True; the app's setting) or warn and
            train anyway (False, the default: the run may be the first part of one resumed).

    Shortcuts kept for one release (each given one replaces a field of the specs; see
    :func:`torchapprox.attach`): ``bitwidth_overrides`` (rules pinning bits),
    ``activation_grid`` (``input.grid``), ``recompute_inputs`` (``input.recompute``),
    ``per_channel_weights``, ``per_token_inputs``, ``range_gradient``, ``eval_range``;
    ``bn_reestimate=True`` adds a :class:`BatchNormReestimation` and ``lr_rewarm_steps=N`` a
    :class:`LearningRateRewarm` of N steps (their state saved in this callback's).

    Bitwidth drops are logged as ``quant/transition`` (the new bits) at the step they
    happen, and every callback of the trainer with an ``on_bitwidth_change(trainer,
    pl_module, old, new)`` method hears every change.

    Raises:
        TypeError, ValueError: for a bad schedule, spec, rule or argument, at construction.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from callbacks import QuantizationAwareTraining
        >>> from callbacks.schedules import LinearBitwidth
        >>> qat = QuantizationAwareTraining(LinearBitwidth(16, 4, start_epoch=0, end_epoch=3),
        ...                                 input=ta.QuantSpec(grid="auto", granularity="per_token"))
        >>> trainer = Trainer(max_epochs=5, callbacks=[qat])   # 16, 12, 8, 4, 4 bits
    """

    def __init__(
        self,
        schedule: int | dict | BitwidthSchedule | Any = 8,
        *,
        weight: QuantSpec | Mapping[str, Any] | None = None,
        input: QuantSpec | Mapping[str, Any] | None = None,
        rules: Mapping[str, Mapping[str, Any]] | None = None,
        quantize_weights: bool = True,
        quantize_activations: bool = True,
        exclude: str | Iterable[str] = (),
        log_every_n_steps: int | None = None,
        log_histograms_every_n_steps: int | None = None,
        verbose: bool = True,
        interval: str = "epoch",
        calibrate_batches: int = 0,
        strict_schedule: bool = False,
        bitwidth_overrides: dict[str, int] | None = None,
        activation_grid: str | None = None,
        recompute_inputs: bool | None = None,
        per_channel_weights: bool | None = None,
        range_gradient: bool | str | None = None,
        eval_range: str | None = None,
        per_token_inputs: bool | None = None,
        quantize_pooling: bool = False,
        freeze_batchnorm: float | None = None,
        bn_reestimate: bool = False,
        lr_rewarm_steps: int = 0,
    ) -> None:
        self.schedule = as_schedule(schedule)
        self.quantize_weights = check_bool(quantize_weights, "quantize_weights")
        self.quantize_activations = check_bool(quantize_activations, "quantize_activations")
        if not (self.quantize_weights or self.quantize_activations):
            raise ValueError(
                "`quantize_weights` and `quantize_activations` are both False: nothing would be quantized"
            )
        weight_spec = as_spec(weight, "weight", QuantSpec()) if self.quantize_weights else None
        input_spec = as_spec(input, "input", DEFAULT_INPUT) if self.quantize_activations else None
        self.weight_spec, self.input_spec, self.rules = apply_shortcuts(
            weight_spec, input_spec, check_rules(rules), activation_grid=activation_grid,
            recompute_inputs=recompute_inputs, per_channel_weights=per_channel_weights, range_gradient=range_gradient,
            eval_range=eval_range, per_token_inputs=per_token_inputs, bitwidth_overrides=bitwidth_overrides)
        self.exclude = check_patterns(exclude)
        self.log_every_n_steps = _check_interval(log_every_n_steps, "log_every_n_steps")
        self.log_histograms_every_n_steps = _check_interval(log_histograms_every_n_steps,
                                                            "log_histograms_every_n_steps")
        self.verbose = check_bool(verbose, "verbose")
        if interval not in ("epoch", "step"):
            raise ValueError(f"`interval` must be 'epoch' or 'step', got {interval!r}")
        self.interval = interval
        if isinstance(calibrate_batches, bool) or not isinstance(calibrate_batches, numbers.Integral) \
                or calibrate_batches < 0:
            raise ValueError(f"`calibrate_batches` must be an int >= 0 (0: off), got {calibrate_batches!r}")
        self.calibrate_batches = int(calibrate_batches)
        if self.calibrate_batches and self.input_spec is not None and self.input_spec.granularity == "per_token":
            raise ValueError(f"`calibrate_batches={self.calibrate_batches}` freezes one range per input tensor, but "
                             "`per_token_inputs=True` gives each token its own scale: use one of the two")
        if self.calibrate_batches and self.input_spec is not None and \
                not quantizer_class(self.input_spec.quantizer).supports_calibration:
            raise ValueError(f"`calibrate_batches={self.calibrate_batches}` freezes input ranges, which the "
                             f"{self.input_spec.quantizer!r} family does not keep (its input steps are constants "
                             "already): use calibrate_batches=0")
        if not self.calibrate_batches and self.input_spec is not None and self.input_spec.range == "static":
            raise ValueError("the input spec has range='static', whose ranges calibration freezes: give "
                             "`calibrate_batches` (training batches to calibrate on, e.g. 16)")
        self.strict_schedule = check_bool(strict_schedule, "strict_schedule")
        self.quantize_pooling = check_bool(quantize_pooling, "quantize_pooling")
        if freeze_batchnorm is not None and (isinstance(freeze_batchnorm, bool)
                                             or not isinstance(freeze_batchnorm, numbers.Real)
                                             or not 0 <= freeze_batchnorm <= 1):
            raise ValueError(f"`freeze_batchnorm` must be None or a fraction of the training epochs in [0, 1], "
                             f"got {freeze_batchnorm!r}")
        if freeze_batchnorm is not None and (self.weight_spec is None or not self._folds_any()):
            # A warning, not an error: a sweep over fold_batchnorm keeps one setting for both.
            rank_zero_warn(f"`freeze_batchnorm={freeze_batchnorm}` freezes the statistics of folded BatchNorm, and no "
                           "weight spec or rule sets fold_batchnorm=True: it has no effect")
        self.freeze_batchnorm = None if freeze_batchnorm is None else float(freeze_batchnorm)
        self.companions: list[Callback] = []  # made from the legacy keywords; hooks forwarded
        if check_bool(bn_reestimate, "bn_reestimate"):
            self.companions.append(BatchNormReestimation())
        if isinstance(lr_rewarm_steps, bool) or not isinstance(lr_rewarm_steps, numbers.Integral) \
                or lr_rewarm_steps < 0:
            raise ValueError(f"`lr_rewarm_steps` must be an int >= 0, got {lr_rewarm_steps!r}")
        if lr_rewarm_steps:
            self.companions.append(LearningRateRewarm(int(lr_rewarm_steps)))
        # The epoch (or step, with interval="step") whose bitwidth the model runs at: saved in
        # checkpoints, so that test(ckpt_path=...) evaluates at the bitwidth it was trained at.
        self.epoch: int | None = None
        self.bitwidth: int = self.schedule(0)
        self.quantized_layers: list[str] = []
        self._collector: StatisticsCollector | None = None  # open on a logging step
        self._recording_step: int | None = None
        self._last_logged_step: int | None = None
        self._calibrated = False
        self._steps_synchronized = False
        self._adopted = False  # the quantizers came with the model (trained by another callback)
        self._module: weakref.ref | None = None  # the LightningModule the quantizers sit on
        self._pending_state: dict[str, Any] | None = None

    # Read-only views of the specs under the 0.2 keywords' names (kept for one release).
    @property
    def bitwidth_overrides(self) -> dict[str, int]:
        """The rules that pin bits, as ``{pattern: bits}``."""
        return {pattern: fields["bits"] for pattern, fields in self.rules.items() if "bits" in fields}

    @property
    def activation_grid(self) -> str | None:
        return None if self.input_spec is None else self.input_spec.grid

    @property
    def recompute_inputs(self) -> bool | None:
        return None if self.input_spec is None else self.input_spec.recompute

    @property
    def per_channel_weights(self) -> bool:
        return self.weight_spec is not None and self.weight_spec.granularity == "per_channel"

    @property
    def per_token_inputs(self) -> bool:
        return self.input_spec is not None and self.input_spec.granularity == "per_token"

    @property
    def eval_range(self) -> str:
        return "running" if self.input_spec is not None and self.input_spec.range == "running" else "batch"

    @property
    def bn_reestimate(self) -> bool:
        return any(isinstance(c, BatchNormReestimation) for c in self.companions)

    @property
    def lr_rewarm_steps(self) -> int:
        return next((c.steps for c in self.companions if isinstance(c, LearningRateRewarm)), 0)

    # ---------------------------------------------------------------- attach and schedule
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._check_schedule(trainer)
        if self.interval == "epoch" and trainer.max_epochs is not None and trainer.max_epochs > 0:
            self._allow_one_compile_per_bitwidth({self.schedule(e) for e in range(trainer.max_epochs)})
        if is_overridden("configure_model", pl_module, LightningModule) and not self._attached_to(pl_module):
            # Lightning builds those layers in configure_model(), after setup() and right
            # before the strategy wraps the model (DDP, FSDP) and builds the optimizers, with
            # no callback hook in between (Trainer._run): attach as configure_model returns.
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
                      if self._candidate(layer) and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)]
        if previous is pl_module and ta.quantized_layers(pl_module) and set(candidates) <= set(self.quantized_layers):
            return self.quantized_layers
        if previous is not pl_module and self._quantizes_as_configured(pl_module):
            # Trained by another callback with these options (a new Trainer to test it, a
            # second fit): keep its quantizers, their bits and what they learned or froze.
            self._module = weakref.ref(pl_module)
            self._adopted = True
            self.quantized_layers = list(ta.quantized_layers(pl_module))
            unpinned = [q.bitwidth for q in pl_module.modules() if isinstance(q, ta.ApproxQuantizer) and not q.pinned]
            if unpinned:
                self.bitwidth = max(set(unpinned), key=unpinned.count)
            return self.quantized_layers
        if previous is not pl_module and _holds_trained_state(pl_module):
            rank_zero_warn("QuantizationAwareTraining: the model's quantizers differ from this callback's options; "
                           "they are replaced, and their learned steps and calibrated or running ranges with them")
        kept = ta.quantizer_state(pl_module) if previous is pl_module else {}
        self.quantized_layers = ta.attach(pl_module, self.bitwidth, weight=self.weight_spec, input=self.input_spec,
                                          rules=self.rules, exclude=self.exclude,
                                          weights=self.weight_spec is not None,
                                          activations=self.input_spec is not None,
                                          quantize_pooling=self.quantize_pooling)
        if not self.quantized_layers:
            excluded = f" (exclude={list(self.exclude)})" if self.exclude else ""
            raise ValueError(
                f"{type(pl_module).__name__} has no layer to quantize{excluded}: QuantizationAwareTraining "
                f"quantizes {', '.join(registered_types())} and the types registered with torchapprox.register_layer"
            )
        self._module = weakref.ref(pl_module)
        if kept:
            ta.load_quantizer_state(pl_module, kept)
        if self._pending_state is not None:  # a checkpoint's state arrived before the layers existed
            state, self._pending_state = self._pending_state, None
            self._load_quantization(pl_module, state)
        if self.verbose:
            rank_zero_info(f"QuantizationAwareTraining: {ta.coverage_summary(pl_module)}")
        return self.quantized_layers

    def _folds_any(self) -> bool:
        return self.weight_spec.fold_batchnorm or any(
            rule.get("fold_batchnorm") or (rule.get("weight") or {}).get("fold_batchnorm") for rule in self.rules.values())

    def _candidate(self, layer: torch.nn.Module) -> bool:
        """Whether attach() would consider this layer (pooling only with quantize_pooling)."""
        layer_type = find_layer_type(layer)
        return layer_type is not None and (not layer_type.pooling or self.quantize_pooling and quantizable_pooling(layer))

    def _quantizes_as_configured(self, pl_module: LightningModule) -> bool:
        """Whether ``pl_module`` carries exactly the quantizers this callback would attach
        (the same layers, tensors and specs; bits aside where no rule pins them)."""
        existing = ta.quantized_layers(pl_module)
        if not existing:
            return False
        expected = {}
        for name, layer in pl_module.named_modules():
            layer_type = find_layer_type(layer)
            if not self._candidate(layer) or any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            specs = resolve(name, self.weight_spec, self.input_spec, self.rules)
            if specs.weight is not None and not layer_type.pooling or specs.input is not None:
                expected[name] = (layer_type, specs)
        if set(expected) != set(existing):
            return False
        for name, (layer_type, specs) in expected.items():
            layer = existing[name]
            weights, inputs = quantized_tensor_names(layer)
            wanted = ({w: (specs.weight, specs.weight_pinned) for w in layer_type.weight_layout(layer)}
                      if specs.weight is not None else {})
            wanted.update({i: (specs.input, specs.input_pinned) for i in layer_type.inputs} if specs.input is not None
                          else {})
            if set(wanted) != {*weights, *inputs}:
                return False
            for tensor, (spec, pinned) in wanted.items():
                quantizer = getattr(layer, f"{tensor}_quantizer")
                # A quantizer pinned where no rule pins it had its bits assigned in training
                # (MixedPrecision): still this configuration.
                if quantizer.spec.replace(bits=spec.bits) != spec \
                        or (pinned and (not quantizer.pinned or quantizer.spec.bits != spec.bits)):
                    return False
        return True

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

    def _allow_one_compile_per_bitwidth(self, bitwidths: set[int]) -> None:
        """torch.compile specializes a graph on every bitwidth (a Python int of the quantizer),
        in training and in evaluation: an anneal through many bitwidths would exceed dynamo's
        recompile limit (8) and fall back to eager with one warning. Raise the limit so that
        each of the schedule's bitwidths compiles once per mode (never lower it).
        ``torch._dynamo.config`` is where torch documents this setting; it has no public setter."""
        import torch._dynamo.config as dynamo_config

        needed = 2 * len(bitwidths) + 8
        if dynamo_config.recompile_limit < needed:
            if self.verbose:
                rank_zero_info(f"QuantizationAwareTraining: torch._dynamo.config.recompile_limit raised from "
                               f"{dynamo_config.recompile_limit} to {needed}, so that torch.compile compiles each of "
                               f"the schedule's {len(bitwidths)} bitwidths once instead of falling back to eager")
            dynamo_config.recompile_limit = needed

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
                bitwidths = {self.schedule(step) for step in range(min(int(steps), 10**6))}
                self._check_reaches_final_bits(int(steps), "step", f"{int(steps)} training steps")
                self._allow_one_compile_per_bitwidth(bitwidths)
        self._calibrated = False
        self._steps_synchronized = False
        for companion in self.companions:
            companion.on_train_start(trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_attached(pl_module)
        # The strategy may have replaced BatchNorm modules since setup (sync_batchnorm).
        batchnorm_fold.rebind(pl_module)
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
        if self.interval == "epoch":
            self._apply(trainer.current_epoch, trainer, pl_module)
        if self.freeze_batchnorm is not None and trainer.max_epochs is not None and trainer.max_epochs > 0:
            # A function of the epoch, so a resumed run freezes where the uninterrupted one did.
            frozen = trainer.current_epoch >= int(self.freeze_batchnorm * trainer.max_epochs)
            if batchnorm_fold.batchnorm_frozen(pl_module) is False and frozen:
                ta.freeze_batchnorm(pl_module, True)
                if self.verbose:
                    rank_zero_info(f"QuantizationAwareTraining: epoch {trainer.current_epoch}, folded BatchNorm "
                                   "statistics frozen")
            elif batchnorm_fold.batchnorm_frozen(pl_module) and not frozen:
                ta.freeze_batchnorm(pl_module, False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for companion in self.companions:
            companion.on_train_epoch_end(trainer, pl_module)
        self._synchronize(trainer, pl_module)  # before the epoch's checkpoints are written

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for companion in self.companions:
            companion.on_train_end(trainer, pl_module)
        if self.calibrate_batches and not self._calibrated:
            self._calibrate(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close_collector()
        for companion in self.companions:
            companion.teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close_collector()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit":  # during fit the training loop has set the bitwidth
            self.on_test_start(trainer, pl_module)
        else:
            self._synchronize(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_attached(pl_module)
        batchnorm_fold.rebind(pl_module)
        if self.epoch is not None or not self._adopted:
            self._apply(self.epoch if self.epoch is not None else self._position(trainer), trainer, pl_module)
        # else: a model trained elsewhere, evaluated as it is (no checkpoint says its epoch)
        self._synchronize(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_test_start(trainer, pl_module)

    def _apply(self, position: int, trainer: Trainer, pl_module: LightningModule) -> None:
        bitwidth = self.schedule(position)
        old = self.bitwidth
        if self.verbose and bitwidth != old:
            rank_zero_info(f"QuantizationAwareTraining: {self.interval} {position}, {old} -> {bitwidth} bits")
        self.epoch, self.bitwidth = position, bitwidth
        ta.set_bitwidth(pl_module, bitwidth)
        if bitwidth != old and trainer.training:
            self._on_bitwidth_change(trainer, pl_module, old, bitwidth)

    def _on_bitwidth_change(self, trainer: Trainer, pl_module: LightningModule, old: int, new: int) -> None:
        self._steps_synchronized = False  # learned steps may start again from the data
        if new < old:
            for logger in trainer.loggers:
                logger.log_metrics({"quant/transition": float(new)}, step=trainer.global_step)
        listeners = [*self.companions, *(c for c in trainer.callbacks if c is not self)]
        for listener in listeners:
            hook = getattr(listener, "on_bitwidth_change", None)
            if callable(hook):
                hook(trainer, pl_module, old, new)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # A learned input step starts from each process's own first batch: average the
        # steps once, before the first update, so that every rank trains the same ones.
        if not self._steps_synchronized:
            self._steps_synchronized = True
            if any(p.requires_grad for q in pl_module.modules() if isinstance(q, ta.ApproxQuantizer)
                   for p in q.parameters(recurse=False)):
                self._synchronize(trainer, pl_module)

    # ------------------------------------------------------------ calibration, DDP state
    def _is_last_training_batch(self, trainer: Trainer, batch_idx: int) -> bool:
        if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        batches = trainer.num_training_batches
        return last_epoch and isinstance(batches, int) and batch_idx + 1 >= batches

    def _calibrate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device

        def forward(model, batch):
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            return model(inputs.to(device))

        ranges = calibrate(pl_module, trainer.train_dataloader, forward=forward, max_batches=self.calibrate_batches)
        self._calibrated = True
        self._synchronize(trainer, pl_module)  # every rank evaluates and checkpoints the same ranges
        if self.verbose:
            rank_zero_info(f"QuantizationAwareTraining: froze {len(ranges)} input ranges on "
                           f"{self.calibrate_batches} training batches (static scales from now on)")

    def _synchronize(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Running and calibrated ranges are reduced over the processes (DDP): every rank
        evaluates with, and rank zero's checkpoint holds, what every rank uses."""
        all_reduce = all_reduce_function(trainer)
        if all_reduce is None or not self._attached_to(pl_module):
            return
        ta.synchronize_quantizers(pl_module, all_reduce)

    # ------------------------------------------------------------------------ telemetry
    def _interval(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.interval == "step":
            if self.schedule(trainer.global_step) != self.bitwidth:
                self._apply(trainer.global_step, trainer, pl_module)
            else:  # unchanged: skip walking the model's modules on every step
                self.epoch = trainer.global_step
        for companion in self.companions:
            companion.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        step = trainer.global_step
        if trainer.loggers and step % self._interval(trainer) == 0 and step != self._last_logged_step:
            self._close_collector()
            self._collector = ta.collect_statistics(pl_module).__enter__()
            self._recording_step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._recording_step is not None:
            self._log_statistics(trainer, pl_module)
        if self.calibrate_batches and not self._calibrated and self._is_last_training_batch(trainer, batch_idx):
            self._calibrate(trainer, pl_module)

    def _close_collector(self) -> None:
        if self._collector is not None:
            self._collector.close()
            self._collector = None

    def _log_statistics(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step, collector = self._recording_step, self._collector
        self._close_collector()
        self._recording_step, self._last_logged_step = None, step
        # One collective of a fixed size on every rank, whichever layers ran there.
        metrics = collector.reduced(all_reduce_function(trainer), device=pl_module.device)
        for tag, value in metrics.items():
            if not math.isfinite(value):
                layer = tag.split("/")[1:-2]
                raise RuntimeError(
                    f"QuantizationAwareTraining: {tag} is {value} at step {step} "
                    f"(layer {'/'.join(layer)!r}): training diverged. Lower the learning rate, "
                    "raise the bitwidth or exclude the layer."
                )
        metrics["quant/bitwidth"] = float(self.bitwidth)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        histogram_interval = self.log_histograms_every_n_steps
        if histogram_interval and step % histogram_interval == 0:
            self._log_histograms(trainer, pl_module, step)

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
            error = quantizer.fake_quantize(weight)[0] - weight
            for logger in loggers:
                logger.experiment.add_histogram(f"quant/{layer_name}/weight/values", weight, step)
                logger.experiment.add_histogram(f"quant/{layer_name}/weight/error", error, step)

    def __getstate__(self) -> dict[str, Any]:
        # A weak reference and an open collector cannot be pickled (ddp_spawn pickles
        # callbacks): setup() finds the module again in the new process.
        return {**self.__dict__, "_module": None, "_collector": None, "_recording_step": None}

    # --------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain Python types and tensors (loads with ``torch.load(weights_only=True)``): the
        epoch and bitwidth, the whole quantization (each quantizer's spec and its running or
        calibrated ranges: :func:`torchapprox.quantization_state`) and the companions'
        states. The model's state dict keeps the plain model's keys."""
        module = self._module() if self._module is not None else None
        quantization = ta.quantization_state(module) if module is not None and ta.quantized_layers(module) else None
        return {"epoch": self.epoch, "bitwidth": int(self.bitwidth), "quantization": quantization,
                "calibrated": self._calibrated,
                "companions": {type(c).__name__: c.state_dict() for c in self.companions}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch = state_dict.get("epoch")
        self.bitwidth = state_dict.get("bitwidth", self.bitwidth)
        self._calibrated = bool(state_dict.get("calibrated", False))
        for companion in self.companions:
            saved = (state_dict.get("companions") or {}).get(type(companion).__name__)
            if saved is not None:
                companion.load_state_dict(saved)
        module = self._module() if self._module is not None else None
        if module is not None and ta.quantized_layers(module):
            self._load_quantization(module, state_dict)  # restored after setup() attached
        else:
            self._pending_state = state_dict

    def _load_quantization(self, module: LightningModule, state_dict: dict[str, Any]) -> None:
        quantization = state_dict.get("quantization")
        if quantization is None:  # a checkpoint of torchapprox 0.2: the ranges alone
            ta.load_quantizer_state(module, dict(state_dict.get("quantizer_state") or {}))
            return
        _check_same_quantization(module, quantization)
        _restore_bits(module, quantization)
        ta.load_quantizer_state(module, dict(quantization.get("tensors") or {}))


def _check_same_quantization(module: LightningModule, saved: Mapping[str, Any]) -> None:
    """A checkpoint resumes the quantization it was trained with: specs that differ (other
    than the bits the schedule sets) are an error naming the first difference."""
    current = ta.quantization_state(module)["layers"]
    for layer, tensors in saved.get("layers", {}).items():
        for tensor, entry in tensors.items():
            now = current.get(layer, {}).get(tensor)
            if now is None:
                raise ValueError(f"QuantizationAwareTraining: the checkpoint quantized {layer}.{tensor}, which this run "
                                 "does not: resume with the quantization options it was trained with")
            was, is_ = dict(entry["spec"]), dict(now["spec"])
            # Bits are configuration only where both runs pin them by a rule; pinned in the
            # checkpoint alone, they were assigned during training (MixedPrecision), and restored.
            if not (entry.get("pinned") and now.get("pinned")):
                was.pop("bits"), is_.pop("bits")
            if was != is_:
                field = next(k for k in was if was[k] != is_.get(k))
                raise ValueError(f"QuantizationAwareTraining: the checkpoint quantized {layer}.{tensor} with "
                                 f"{field}={was[field]!r}, this run with {field}={is_.get(field)!r}: resume with the "
                                 "quantization options it was trained with")


def _holds_trained_state(module: LightningModule) -> bool:
    """Quantizers with something they learned or froze: ranges kept between calls, or
    parameters of their own."""
    return bool(ta.quantizer_state(module)) or any(
        True for q in module.modules() if isinstance(q, ta.ApproxQuantizer) for _ in q.parameters(recurse=False))


def _restore_bits(module: LightningModule, saved: Mapping[str, Any]) -> None:
    """Every quantizer at the bits the checkpoint was saved at. A restore, not a change: the
    state loaded with the model (learned steps) belongs to those bits, so no
    ``on_bitwidth_change`` runs (it would move a learned step away from them)."""
    layers = ta.quantized_layers(module)
    for layer, tensors in saved.get("layers", {}).items():
        for tensor, entry in tensors.items():
            quantizer = getattr(layers[layer], f"{tensor}_quantizer")
            bits = int(entry["spec"]["bits"])
            if quantizer.spec.bits != bits:
                quantizer.spec = quantizer.spec.replace(bits=bits)


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


__all__ = ["QuantizationAwareTraining", "STAT_NAMES"]
