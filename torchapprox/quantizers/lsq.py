"""LSQQuant: learned step sizes (the "lsq" family).

Learned Step Size Quantization (Esser, McKinstry, Bablani, Appuswamy, Modha, "Learned Step
Size Quantization", ICLR 2020): the step ``s`` between levels is a trainable parameter.
Forward, eq. 1-2 of the paper: ``x_fake = round(clip(x / s, -Qn, Qp)) * s`` (the one
rounding op with the clip range ``[-Qn s, Qp s]``). Backward, the straight-through
estimator for x (zero where clipped) and, for the step, eq. 3: ``d x_fake / d s =
round(x / s) - x / s`` inside the range, ``-Qn`` or ``Qp`` where clipped, summed over the
elements that share the step and scaled by
``g = 1 / sqrt(N * Qp)`` (section 2.2: ``N`` the elements per step, the number of features
of one sample for inputs, ``Qp`` the grid's top level), so that the step learns at the pace
of the weights.

- Initialisation (from the first tensor the quantizer sees; a persistent ``initialized``
  flag, so checkpoints restore the learned step rather than re-initialise it):
  ``options={"init": "lsq"}`` (the paper's ``2 * mean|x| / sqrt(Qp)``, the default),
  ``"minmax"`` (``max|x| / Qp``: the min/max quantizer's step, nothing clipped at first) or
  ``"mse"`` (the step with the least squared quantization error among 64 fractions of
  ``max|x| / Qp``, as LSQ+ initialises, Bhalgat et al. 2020).
- Annealing: when the bits change the step moves to the new grid, so that a 16 -> 8 -> 4
  anneal does not start a phase with a step 258x (16 -> 8) too small.
  ``options={"anneal": "reinit"}`` (the default): the next tensor initialises it again, at
  the new bits, as the first did. ``"rescale"``: it keeps the clipping range ``Qp * s``
  learned so far, ``s_new = s_old * Qp_old / Qp_new`` (good after a phase that trained the
  range; poor right after the paper's initialisation at 16 bits, whose range
  ``2 mean|x| sqrt(Qp)`` is hundreds of times max|x|).
- Grids: ``signed`` ([-(2^(b-1)-1), 2^(b-1)-1] steps), ``unsigned`` ([0, 2^b - 1]),
  ``auto`` (per call: unsigned where the tensor is non-negative, signed otherwise; one
  value read back). Granularity: per tensor; per channel for weights (one step per output
  channel); per token for inputs, where the learned parameter is a fraction ``r`` of each
  token's own range, ``step_t = r * max|x_t| / Qp`` (a learned clipping ratio, as PACT,
  Choi et al. 2018, and LSQ+, Bhalgat et al. 2020, learn a clip; ``r`` starts at 1, the
  min/max step, or at the least-error fraction for ``init="mse"``). Stored ranges are not
  this family's: refused by the spec.
- The step is a Parameter of the quantizer (in ``state_dict``, keys
  ``<layer>.<tensor>_quantizer.step`` and ``.initialized``): an optimizer built after
  ``attach`` trains it, checkpoints hold it. ``torchapprox.float_state_dict`` drops those
  keys for the plain float model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import reference
from .approx_quantizer import ApproxQuantizer, check_float_tensor
from .ops import _functorch_transforms_active, apply, differentiable, with_eager_twin
from .qparams import QParams, quantize_dequantize
from .registry import register_quantizer

INITS = ("lsq", "minmax", "mse")


def _host_reads_allowed() -> bool:
    """Whether a value may be read back to the host: not while torch.export, torch.jit.trace,
    torch.compile or a torch.func transform records the computation."""
    return not (torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or _functorch_transforms_active())
MSE_CANDIDATES = 64  # steps tried by the "mse" initialisation, from max|x| / Qp down to 1/64 of it
ANNEALS = ("reinit", "rescale")
OPTIONS = ("init", "anneal")


def _grad_scaled(step: torch.Tensor, factor: float) -> torch.Tensor:
    """``step`` in value, its gradient times ``factor`` (the paper's gradscale)."""
    scaled = step * factor
    return (step - scaled).detach() + scaled


def _grouped_error(error: torch.Tensor, groups: int) -> torch.Tensor:
    """Per output channel sums of a grouped ConvTranspose weight's error [in, out/groups, ...]."""
    view = error.reshape(groups, error.shape[0] // groups, error.shape[1], -1)
    return view.sum(dim=(1, 3)).reshape(-1)


@with_eager_twin
class LearnedStep(torch.autograd.Function):
    """``apply(LearnedStep, x, scale, qmin, qmax)``: ``round(clamp(x / scale, qmin, qmax)) *
    scale``, with the gradients of x and of the scale of Esser et al. 2020, eq. 3."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale, qmin, qmax):
        out = torch.ops.torchapprox.round_to_grid(x, scale, qmin, qmax)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, scale, qmin, qmax = inputs
        ctx.save_for_backward(x, scale)
        ctx.bounds = (qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of this backward is being recorded: plain ops
            grad_x, grad_scale = reference.learned_step_backward(grad, x, scale, *ctx.bounds)
        else:
            grad_x, grad_scale = torch.ops.torchapprox.learned_step_backward(grad, x, scale.detach(), *ctx.bounds)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_scale if ctx.needs_input_grad[1] else None,
                None, None)


@register_quantizer("lsq")
class LSQQuant(ApproxQuantizer):
    """Learned step size quantizer (see the module docstring for the formulas and source)."""

    def __init__(self, spec, *, role=None, channel_axis=None, channel_groups=1, tensor=None) -> None:
        super().__init__(spec, role=role, channel_axis=channel_axis, channel_groups=channel_groups)
        if spec.granularity == "per_channel" and self.channel_axis is None:
            self.channel_axis = 0
        self.step = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._known_initialized = False  # a host-side copy of the flag: no device read per call
        if tensor is not None:
            # A weight is known at attach: its steps start from it, with their final shape,
            # before an optimizer or DDP sees them (identical on every process).
            self._initialize(tensor)

    @classmethod
    def from_spec(cls, spec, *, role=None, channel_axis=None, channel_groups=1, tensor=None) -> LSQQuant:
        return cls(spec, role=role, channel_axis=channel_axis, channel_groups=channel_groups, tensor=tensor)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # nn.Module's hook for loading (BatchNorm overrides it too): the flag may change, and
        # is read here, in eager mode, so that an exported or traced forward need not read it.
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = bool(self.initialized)

    @classmethod
    def check_spec(cls, spec) -> None:
        unknown = [key for key, _ in spec.options if key not in OPTIONS]
        if unknown:
            raise ValueError(f"QuantSpec `options` {dict(spec.options)!r}: the 'lsq' family takes only 'init' "
                             f"({' or '.join(map(repr, INITS))}) and 'anneal' ({' or '.join(map(repr, ANNEALS))})")
        for option, allowed, default in (("init", INITS, "lsq"), ("anneal", ANNEALS, "reinit")):
            if spec.option(option, default) not in allowed:
                raise ValueError(f"QuantSpec `options['{option}']` must be one of {', '.join(map(repr, allowed))} "
                                 f"for the 'lsq' family, got {spec.option(option)!r}")
        if spec.range != "dynamic":
            raise ValueError(f"QuantSpec `range={spec.range!r}`: the 'lsq' family learns its step; its range is "
                             "neither running nor calibrated (use range='dynamic')")
        if spec.range_gradient:
            raise ValueError("QuantSpec `range_gradient=True` is a 'minmax' option: the 'lsq' family's step "
                             "takes its own gradient")

    # ----------------------------------------------------------------------- helpers
    def _top(self, unsigned: bool) -> int:
        return reference.unsigned_max(self.bitwidth) if unsigned else reference.int_max(self.bitwidth)

    def _channel_dims(self, x: torch.Tensor) -> tuple[int, list[int]]:
        """(the channel axis, the dimensions reduced per channel) of a per-channel weight."""
        axis = self.channel_axis % x.dim()
        return axis, [d for d in range(x.dim()) if d != axis]

    def _broadcast(self, step: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The per-channel steps shaped to broadcast against x (groups expanded)."""
        if step.dim() == 0:
            return step
        axis, _ = self._channel_dims(x)
        groups = self.channel_groups
        if groups > 1:  # a grouped ConvTranspose: output channel g * (C/groups) + j, rows of group g
            per_group = step.reshape(groups, 1, -1, *([1] * (x.dim() - 2)))
            full = per_group.expand(groups, x.shape[0] // groups, *per_group.shape[2:])
            return full.reshape(x.shape[0], *per_group.shape[2:])
        return step.reshape([-1 if d == axis else 1 for d in range(x.dim())])

    def _token_grid(self, x: torch.Tensor) -> str:
        """Per token: the grid, decided once per tensor on the auto grid (one value read back)."""
        if self.spec.grid != "auto":
            return self.spec.grid
        return "unsigned" if x.numel() == 0 or bool(x.detach().min() >= 0) else "signed"

    def _token_ranges(self, x: torch.Tensor, grid: str) -> torch.Tensor:
        """Each token's min/max step ``max|x_t| / Qp`` (shape [..., 1]; no gradient)."""
        return torch.ops.torchapprox.minmax_scale(x.detach(), self.spec.bits, grid, list(range(x.dim() - 1)))

    @torch.no_grad()
    def _initialize_ratio(self, x: torch.Tensor) -> None:
        """Per token the learned parameter is a fraction of each token's own range: 1 (the
        min/max step) for init "lsq" and "minmax", the least-error fraction for "mse"."""
        ratio = torch.ones((), dtype=torch.float32)
        if self.spec.option("init", "lsq") == "mse" and x.numel():
            grid = self._token_grid(x)
            ranges = self._token_ranges(x, grid)
            qmin, qmax = reference.grid_bounds(self.spec.bits, grid)
            compute = x.detach().to(ranges.dtype)
            errors = [(torch.clamp(torch.round(compute / (ranges * k / MSE_CANDIDATES)), qmin, qmax)
                       * (ranges * k / MSE_CANDIDATES) - compute).square().sum() for k in range(1, MSE_CANDIDATES + 1)]
            ratio = torch.tensor((int(torch.stack(errors).argmin()) + 1) / MSE_CANDIDATES)
        self.step.data = ratio.to(self.step.device, self.step.dtype)
        self.initialized.fill_(True)
        self._known_initialized = True

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        if self.spec.granularity == "per_token":
            self._initialize_ratio(x)
            return
        magnitude = x.detach().float().abs()
        if self.spec.granularity == "per_channel":
            if self.channel_groups > 1:
                rows = x.shape[0] // self.channel_groups
                view = magnitude.reshape(self.channel_groups, rows, x.shape[1], -1)
                mean, top = view.mean(dim=(1, 3)).reshape(-1), view.amax(dim=(1, 3)).reshape(-1)
            else:
                axis, reduce = self._channel_dims(x)
                mean, top = magnitude.mean(dim=reduce), magnitude.amax(dim=reduce)
        else:
            mean, top = magnitude.mean(), magnitude.max()
        unsigned = self.spec.grid == "unsigned" or (self.spec.grid == "auto" and bool(x.min() >= 0))
        levels = self._top(unsigned)
        init = self.spec.option("init", "lsq")
        if init == "lsq":
            step = 2 * mean / math.sqrt(levels)
        elif init == "minmax":
            step = top / levels
        else:
            step = self._mse_step(x.detach().float(), top / levels, unsigned)
        step = torch.where(step > 0, step, torch.ones_like(step))  # an all-zero tensor: step 1
        self.step.data = step.to(self.step.device, self.step.dtype)
        self.initialized.fill_(True)
        self._known_initialized = True

    def _mse_step(self, x: torch.Tensor, largest: torch.Tensor, unsigned: bool) -> torch.Tensor:
        """The step among ``largest * k / 64`` (k = 1..64) with the least squared error of
        the quantized tensor (per channel for per-channel steps): the clipping search of
        Banner et al. 2019 / Bhalgat et al. 2020 (LSQ+), one pass over x per candidate."""
        qmin, qmax = (0, self._top(True)) if unsigned else (-self._top(False), self._top(False))
        best, best_error = largest.clone(), None
        for k in range(MSE_CANDIDATES, 0, -1):
            step = (largest * k / MSE_CANDIDATES).clamp_min(torch.finfo(torch.float32).tiny)
            broadcast = self._broadcast(step, x) if step.dim() else step
            error = (torch.clamp(torch.round(x / broadcast), qmin, qmax) * broadcast - x).square()
            if step.dim():
                axis, reduce = self._channel_dims(x) if self.channel_groups == 1 else (None, None)
                error = error.sum(dim=reduce) if reduce is not None else _grouped_error(error, self.channel_groups)
            else:
                error = error.sum()
            if best_error is None:
                best_error = error
            else:
                better = error < best_error
                best = torch.where(better, step, best)
                best_error = torch.where(better, error, best_error)
        return best

    # -------------------------------------------------------------------- the contract
    @property
    def differentiable_qparams(self) -> bool:
        # The step learns: layers keep the grid values rather than recompute them.
        return self.step.requires_grad

    def compute_qparams(self, x: torch.Tensor) -> QParams:
        if not self._known_initialized:
            if not _host_reads_allowed():
                raise RuntimeError("an 'lsq' quantizer has not seen a tensor yet (its step starts from the first one, "
                                   "and again after a bitwidth change): run a forward pass in eager mode before "
                                   "exporting, tracing or transforming the model")
            if bool(self.initialized):
                self._known_initialized = True
            else:
                self._initialize(x)  # an input's first tensor: the one write a forward makes, once
        spec = self.spec
        per_step = x.numel() // max(self.step.numel(), 1)
        if self.role == "input" and x.dim() > 1:
            per_step = x.numel() // x.shape[0]  # the paper's N_F: the features of one sample
        top_signed, top_unsigned = reference.int_max(spec.bits), reference.unsigned_max(spec.bits)
        factor = 1.0 / math.sqrt(max(per_step, 1) * (top_unsigned if spec.grid == "unsigned" else top_signed))
        step = _grad_scaled(self.step, factor) if torch.is_grad_enabled() and self.step.requires_grad else self.step
        # A step that training pushes through zero is taken by its magnitude, at least the
        # smallest normal number.
        step = step.abs().clamp_min(torch.finfo(step.dtype).tiny)
        if spec.granularity == "per_token":
            # A learned fraction of each token's own range (a learned clipping ratio, as PACT
            # and LSQ+ learn a clip): step_t = ratio * max|x_t| / Qp, its gradient reaching
            # the ratio through every token's step.
            if spec.grid == "auto" and not _host_reads_allowed():
                return self._auto_on_device(x, step, per_token=True)
            grid = self._token_grid(x)
            qmin, qmax = reference.grid_bounds(spec.bits, grid)
            scale = step.to(reference.compute_dtype(x.dtype)) * self._token_ranges(x, grid)
            return QParams(scale, qmin, qmax, None, None, False, True, None)
        scale = self._broadcast(step, x).to(reference.compute_dtype(x.dtype))
        channels = step if self.spec.granularity == "per_channel" else None
        if spec.grid == "auto":
            if not _host_reads_allowed():
                return self._auto_on_device(x, scale, channels=channels)
            # Unsigned levels for a non-negative tensor: one value read back per call.
            unsigned = x.numel() == 0 or bool(x.detach().min() >= 0)
            qmin, qmax = (0, top_unsigned) if unsigned else (-top_signed, top_signed)
        else:
            qmin, qmax = (0, top_unsigned) if spec.grid == "unsigned" else (-top_signed, top_signed)
        return QParams(scale, qmin, qmax, None, None, True, True, channels)

    def _auto_on_device(self, x: torch.Tensor, step_or_scale: torch.Tensor, *, per_token: bool = False,
                        channels: torch.Tensor | None = None) -> QParams:
        """The auto grid decided in the graph (export, tracing, compile, torch.func: no value
        read back): the grid's bounds as a clip range, the same values and gradients."""
        top_signed, top_unsigned = reference.int_max(self.spec.bits), reference.unsigned_max(self.spec.bits)
        unsigned = x.detach().min() >= 0 if x.numel() else torch.ones((), dtype=torch.bool, device=x.device)
        if per_token:
            axes = list(range(x.dim() - 1))
            ranges = torch.where(unsigned, torch.ops.torchapprox.minmax_scale(x.detach(), self.spec.bits, "unsigned", axes),
                                 torch.ops.torchapprox.minmax_scale(x.detach(), self.spec.bits, "signed", axes))
            scale = step_or_scale.to(ranges.dtype) * ranges
        else:
            scale = step_or_scale
        low = torch.where(unsigned, torch.zeros_like(scale), -top_signed * scale)
        high = torch.where(unsigned, top_unsigned * scale, top_signed * scale)
        return QParams(scale, -top_signed, top_unsigned, clip=(low, high), constant=not per_token, channels=channels)

    def fake_quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        """``round(clamp(x / s, qmin, qmax)) * s`` with the paper's gradients: one C++ pass
        on the CPU in each direction (``round_to_grid``, ``learned_step_backward``)."""
        check_float_tensor(x)
        qp = self.qparams(x)
        if torch.compiler.is_exporting() or qp.clip is not None or x.numel() == 0:
            return quantize_dequantize(x, qp), qp
        if differentiable(x, qp.scale) and not torch.jit.is_tracing():
            return apply(LearnedStep, x, qp.scale, qp.qmin, qp.qmax), qp
        out = torch.ops.torchapprox.round_to_grid(x, qp.scale.detach(), qp.qmin, qp.qmax)
        return (out if out.dtype == x.dtype else out.to(x.dtype)), qp

    def constant_qparams(self) -> QParams | None:
        # The auto grid picks its bounds from each tensor's sign: not constant.
        if self.spec.grid == "auto" or not (self._known_initialized or bool(self.initialized)):
            return None
        return self.compute_qparams(torch.zeros((), device=self.step.device))

    def on_bitwidth_change(self, old: int, new: int) -> None:
        if not (self._known_initialized or bool(self.initialized)):
            return  # the first tensor initialises the step at the new bits
        if self.spec.option("anneal", "reinit") == "reinit":
            with torch.no_grad():
                self.initialized.fill_(False)  # the next tensor initialises it at the new bits
            self._known_initialized = False
            return
        if self.spec.granularity == "per_token":
            return  # a fraction of each token's range: the range already follows the bits
        unsigned = self.spec.grid == "unsigned"
        ratio = (2**old - 1 if unsigned else 2 ** (old - 1) - 1) / (2**new - 1 if unsigned else 2 ** (new - 1) - 1)
        with torch.no_grad():
            self.step.mul_(ratio)

    def synchronize(self, all_reduce) -> None:
        # Inputs initialise from each process's first batch: average the steps once, so that
        # every rank computes with the same ones (they train identically from then on).
        with torch.no_grad():
            self.step.data = all_reduce(self.step.detach(), "mean")

    def check_state_tensor(self, name: str, tensor: torch.Tensor) -> None:
        raise ValueError(f"LSQQuant keeps its state in the state dict (step, initialized), not {name!r}")

    def extra_repr(self) -> str:
        if not bool(self.initialized):
            return f"{self.spec!r}, step uninitialized"
        step = self.step.detach()
        return f"{self.spec!r}, step={step.item():.4g}" if step.dim() == 0 else \
            f"{self.spec!r}, steps={step.numel()} (mean {step.mean().item():.4g})"
