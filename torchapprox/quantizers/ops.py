"""The fake-quantization kernels as ``torch.library`` custom ops, and autograd around them.

Three ops in the ``torchapprox`` namespace (values: see ``reference.py``):

- ``torchapprox::minmax_scale(Tensor x, int bitwidth, str grid, int[] axes) -> Tensor``:
  the scale factor of x's own range; ``axes=[]`` gives one scale (a 0-dim tensor), ``[k]``
  one per slice along dimension k (shape: x's rank, size 1 off the kept dimensions).
- ``torchapprox::round_to_grid(Tensor x, Tensor scale, int qmin, int qmax) -> Tensor``:
  ``clamp(round(x * scale), qmin, qmax) / scale`` for a scale that broadcasts against x.
- ``torchapprox::fake_quantize(Tensor x, int bitwidth, str grid, int[] axes) -> (Tensor, Tensor)``:
  both in one call, ``(x_fake, scale)``.
- ``torchapprox::range_gradient_backward(Tensor grad, Tensor x, Tensor scale, int bitwidth,
  str grid, int[] axes) -> Tensor``: the gradient of ``fake_quantize`` with the range left
  attached (``range_gradient.py``), for backward passes that record no graph of their own.
- ``torchapprox::learned_step_backward(Tensor grad, Tensor x, Tensor scale, int qmin, int qmax)
  -> (Tensor, Tensor)``: the gradients of x and of a learned step (``lsq.py``), one pass.

Each has a fake kernel (shapes only, for ``torch.compile`` and ``torch.export``), an autograd
formula (the straight-through estimator: the gradient passes where the rounded value is
inside the grid, as in ``torch.fake_quantize_per_tensor_affine``; the scale gets none) and
a vmap rule (a per-tensor scale under ``vmap`` is a scale per batch entry, exactly what a
loop over the entries computes). The implementation registered here (plain torch ops) runs
on every device; on the CPU the C++ kernels of ``cpu_extension`` take over once loaded,
with the same values.

torch.func transforms cannot run the autograd of custom ops (torch 2.13), so the code of
this package calls the ops through the autograd Functions below (``FakeQuantize``,
``RoundToGrid``), whose ``setup_context``/``generate_vmap_rule`` make ``torch.func.grad``
and ``vmap`` work too. Both give the same gradients as the ops' own formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .cpu_extension import kernels_loaded


def check_op_arguments(bitwidth: int, grid: str, axes: list[int] | None = None, ndim: int | None = None) -> None:
    if not 2 <= bitwidth <= 32:
        raise ValueError(f"torchapprox ops: bitwidth must be in 2..32, got {bitwidth}")
    if grid not in reference.GRIDS:
        raise ValueError(f"torchapprox ops: grid must be one of {', '.join(reference.GRIDS)}, got {grid!r}")
    if axes and (sorted(set(axes)) != list(axes) or axes[0] < 0 or (ndim is not None and axes[-1] >= ndim)):
        raise ValueError(f"torchapprox ops: axes must be sorted, distinct dimensions of x (ndim {ndim}), got {axes}")


def _cpu_kernels_take(x: Tensor) -> bool:
    # The first CPU call loads the C++ kernels; from then on the dispatcher sends CPU calls
    # straight to them and this Python implementation sees only the other devices.
    return x.device.type == "cpu" and kernels_loaded()


# ------------------------------------------------------------------------------- the ops
@torch.library.custom_op("torchapprox::minmax_scale", mutates_args=())
def minmax_scale(x: Tensor, bitwidth: int, grid: str, axes: list[int]) -> Tensor:
    check_op_arguments(bitwidth, grid, axes, x.dim())
    if _cpu_kernels_take(x):
        return torch.ops.torchapprox.minmax_scale(x, bitwidth, grid, axes)
    return reference.minmax_scale(x, bitwidth, grid, axes)


@torch.library.custom_op("torchapprox::round_to_grid", mutates_args=())
def round_to_grid(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    if _cpu_kernels_take(x):
        return torch.ops.torchapprox.round_to_grid(x, scale, qmin, qmax)
    return reference.round_to_grid(x, scale, qmin, qmax)


@torch.library.custom_op("torchapprox::fake_quantize", mutates_args=())
def fake_quantize(x: Tensor, bitwidth: int, grid: str, axes: list[int]) -> tuple[Tensor, Tensor]:
    check_op_arguments(bitwidth, grid, axes, x.dim())
    if _cpu_kernels_take(x):
        return torch.ops.torchapprox.fake_quantize(x, bitwidth, grid, axes)
    return reference.fake_quantize(x, bitwidth, grid, axes)


@torch.library.custom_op("torchapprox::range_gradient_backward", mutates_args=())
def range_gradient_backward(grad: Tensor, x: Tensor, scale: Tensor, bitwidth: int, grid: str,
                            axes: list[int]) -> Tensor:
    check_op_arguments(bitwidth, grid, axes, x.dim())
    if grad.shape != x.shape:
        raise ValueError(f"torchapprox ops: grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    if _cpu_kernels_take(x):
        return torch.ops.torchapprox.range_gradient_backward(grad, x, scale, bitwidth, grid, axes)
    return reference.range_gradient_backward(grad, x, scale, bitwidth, grid, axes)


@torch.library.custom_op("torchapprox::learned_step_backward", mutates_args=())
def learned_step_backward(grad: Tensor, x: Tensor, scale: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    if grad.shape != x.shape:
        raise ValueError(f"torchapprox ops: grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    if _cpu_kernels_take(x):
        return torch.ops.torchapprox.learned_step_backward(grad, x, scale, qmin, qmax)
    return reference.learned_step_backward(grad, x, scale, qmin, qmax)


# ------------------------------------------------------------------------------ fake kernels
def _fake_scale(x: Tensor, axes: list[int]) -> Tensor:
    return x.new_empty(reference.scale_shape(x, axes), dtype=reference.compute_dtype(x.dtype))


@minmax_scale.register_fake
def _(x, bitwidth, grid, axes):
    return _fake_scale(x, axes)


@round_to_grid.register_fake
def _(x, scale, qmin, qmax):
    return torch.empty_like(x)


@fake_quantize.register_fake
def _(x, bitwidth, grid, axes):
    return torch.empty_like(x), _fake_scale(x, axes)


@range_gradient_backward.register_fake
def _(grad, x, scale, bitwidth, grid, axes):
    return torch.empty_like(x)


@learned_step_backward.register_fake
def _(grad, x, scale, qmin, qmax):
    return torch.empty_like(x), torch.empty_like(scale)


# --------------------------------------------------------------------------------- autograd
def _needs_mask(grid: str) -> bool:
    # A scale taken from the tensor's own range never clips on the signed grid, nor on the
    # grid "auto" picks; the unsigned grid clips everything below zero.
    return grid == "unsigned"


def _setup_minmax(ctx, inputs, output) -> None:
    x, bitwidth, grid, _ = inputs
    scale = output[1] if isinstance(output, tuple) else output
    ctx.mark_non_differentiable(scale)
    ctx.set_materialize_grads(False)  # no zero tensor for the scale's (absent) gradient
    ctx.bounds = reference.grid_bounds(bitwidth, grid)
    ctx.mask = _needs_mask(grid)
    if ctx.mask:
        ctx.save_for_backward(x, scale)


def _fake_quantize_backward(ctx, grad, _grad_scale):
    if grad is None or not ctx.mask:
        return grad, None, None, None
    x, scale = ctx.saved_tensors
    return grad * reference.straight_through_mask(x, scale, *ctx.bounds), None, None, None


def _setup_round(ctx, inputs, output) -> None:
    x, scale, qmin, qmax = inputs
    ctx.save_for_backward(x, scale)
    ctx.bounds = (qmin, qmax)


def _round_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    return grad * reference.straight_through_mask(x, scale, *ctx.bounds), None, None, None


def _scale_backward(ctx, _grad):
    return None, None, None, None


fake_quantize.register_autograd(_fake_quantize_backward, setup_context=_setup_minmax)
round_to_grid.register_autograd(_round_backward, setup_context=_setup_round)
minmax_scale.register_autograd(_scale_backward, setup_context=_setup_minmax)


# ------------------------------------------------------------------------------ vmap rules
def _batched_axes(x: Tensor, x_bdim: int, axes: list[int]) -> tuple[Tensor, list[int]]:
    """x with its batch dimension moved to 0, and the axes of a scale per batch entry."""
    return x.movedim(x_bdim, 0), [0] + [a + 1 for a in axes]


def _unbatched_scale(scale: Tensor, axes: list[int]) -> Tensor:
    # A per-tensor scale is 0-dim: per batch entry, shape [B] rather than [B, 1, ...].
    return scale.reshape(scale.shape[0]) if not axes else scale


@minmax_scale.register_vmap
def _(info, in_dims, x, bitwidth, grid, axes):
    x_bdim = in_dims[0]
    if x_bdim is None:
        return minmax_scale(x, bitwidth, grid, axes), None
    x, batched = _batched_axes(x, x_bdim, axes)
    return _unbatched_scale(minmax_scale(x, bitwidth, grid, batched), axes), 0


@fake_quantize.register_vmap
def _(info, in_dims, x, bitwidth, grid, axes):
    x_bdim = in_dims[0]
    if x_bdim is None:
        return fake_quantize(x, bitwidth, grid, axes), (None, None)
    x, batched = _batched_axes(x, x_bdim, axes)
    x_fake, scale = fake_quantize(x, bitwidth, grid, batched)
    return (x_fake, _unbatched_scale(scale, axes)), (0, 0)


@round_to_grid.register_vmap
def _(info, in_dims, x, scale, qmin, qmax):
    x_bdim, scale_bdim = in_dims[:2]
    if x_bdim is None and scale_bdim is None:
        return round_to_grid(x, scale, qmin, qmax), None
    x_rank = x.dim() - (x_bdim is not None)  # the rank the function sees
    if x_bdim is not None:
        x = x.movedim(x_bdim, 0)
    if scale_bdim is not None:
        scale = scale.movedim(scale_bdim, 0)
        # [B] (a 0-dim scale per entry) or [B, *broadcastable]: pad to x's rank plus batch.
        scale = scale.reshape(scale.shape + (1,) * (x_rank + 1 - scale.dim()))
        if x_bdim is None:
            x = x.expand(scale.shape[:1] + x.shape)
    return round_to_grid(x, scale, qmin, qmax), 0


# ------------------------------------------------- autograd Functions for this package's code
def apply(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)`` at the cost of an old-style Function where it can.

    A Function with ``setup_context`` (which torch.func transforms need) makes every
    ``apply`` bind its arguments to ``forward``'s signature with ``inspect``: about 20 us,
    more than the fake quantization of a small tensor. Its old-style twin (``forward(ctx,
    ...)``, made by :func:`with_eager_twin`) skips that. Under torch.func transforms (which
    refuse old-style Functions) and while torch.compile traces, the Function itself is
    applied.
    """
    if torch.compiler.is_compiling() or _functorch_transforms_active():
        return function.apply(*args)
    return function.eager.apply(*args)


def _functorch_transforms_active() -> bool:
    # torch.func exposes no public query of whether a transform (grad, vmap, ...) is active;
    # this is the check torch.autograd.Function.apply itself makes before it refuses an
    # old-style Function, so the two cannot disagree.
    return torch._C._are_functorch_transforms_active()


def with_eager_twin(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Give a setup_context-style Function an old-style twin, ``function.eager`` (see
    :func:`apply`): the same forward, context setup and backward."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = function.forward(*args)
            function.setup_context(ctx, args, output)
            return output

        backward = staticmethod(function.backward)

    Eager.__name__ = Eager.__qualname__ = f"{function.__name__}Eager"
    function.eager = Eager
    return function


@with_eager_twin
class FakeQuantize(torch.autograd.Function):
    """``torchapprox::fake_quantize`` with its straight-through gradient, under torch.func too.

    ``apply(FakeQuantize, x, bitwidth, grid, axes) -> (x_fake, scale)``; the scale is not
    differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, bitwidth, grid, axes):
        return torch.ops.torchapprox.fake_quantize(x, bitwidth, grid, axes)

    setup_context = staticmethod(_setup_minmax)
    backward = staticmethod(_fake_quantize_backward)


@with_eager_twin
class RoundToGrid(torch.autograd.Function):
    """``torchapprox::round_to_grid`` with its straight-through gradient, under torch.func too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale, qmin, qmax):
        return torch.ops.torchapprox.round_to_grid(x, scale, qmin, qmax)

    setup_context = staticmethod(_setup_round)
    backward = staticmethod(_round_backward)


def differentiable(*tensors: Tensor | None) -> bool:
    """Whether autograd will record an op on these tensors: grad mode on and one of them
    requiring grad. When it will not, the ops are called without an autograd Function."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fake_quantize_ste(x: Tensor, bitwidth: int, grid: str, axes: list[int]) -> tuple[Tensor, Tensor]:
    """(x_fake, scale) with the straight-through gradient when one is needed.

    Without a gradient to compute, and under torch.jit.trace (whose graph must not depend
    on the grad mode, and records the op itself, which has its own gradient), the op is
    called directly.
    """
    if differentiable(x) and not torch.jit.is_tracing():
        return apply(FakeQuantize, x, bitwidth, grid, axes)
    return torch.ops.torchapprox.fake_quantize(x, bitwidth, grid, axes)


def round_to_grid_ste(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """``torchapprox::round_to_grid`` with the straight-through gradient when one is needed
    (see :func:`fake_quantize_ste`)."""
    if differentiable(x) and not torch.jit.is_tracing():
        return apply(RoundToGrid, x, scale, qmin, qmax)
    return torch.ops.torchapprox.round_to_grid(x, scale, qmin, qmax)
