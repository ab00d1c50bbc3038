"""The elementwise work of fake quantization, on the fastest path available for a tensor.

- CPU, float32/float64: the fused C++ kernels of ``cpu_extension`` (range and rounding in
  two passes and one dispatch, identity gradient in C++).
- Otherwise, for large contiguous tensors (CUDA, or CPU when the C++ build is unavailable):
  a ``torch.compile``d ``round(x * scale) / scale``, one pass instead of three. Small
  tensors stay eager: a compiled call costs tens of microseconds of dispatch.
- Otherwise the eager torch ops.

Every path does the same operations in the same order, so the numbers are identical (the
tests check this). ``TORCHAPPROX_COMPILE=0`` leaves only the eager ops. If the compiler
fails, a warning says so once and the eager ops are used from then on.
"""

from __future__ import annotations

import warnings

import torch

from .cpu_extension import compile_disabled, fused_ops

# Below this, the ~60 us a compiled call costs in dispatch outweighs the two passes it saves
# (measured on a 2-core CPU: equal at about 2**19 elements, 1.5x faster at 2**20).
COMPILE_MIN_ELEMENTS = 1 << 20

FUSED_DTYPES = (torch.float32, torch.float64)

_compiled = None
_compile_disabled = compile_disabled()


def fused_cpu_ops(x: torch.Tensor):
    """``torch.ops.torchapprox`` when its fused kernels can take ``x``, else None."""
    if not x.is_cpu or x.dtype not in FUSED_DTYPES or x.layout != torch.strided:
        return None
    # Inside torch.compile or a torch.func transform the eager ops are traced, fused and
    # batched by torch itself; the opaque C++ op would only get in the way.
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    return fused_ops()


def round_to_grid_eager(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(x * scale) / scale`` in a new tensor, in three in-place passes."""
    return (x * scale).round_().div_(scale)


def _round_to_grid_flat(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.div(torch.round(x * scale), scale)


def _use_compiled(x: torch.Tensor) -> bool:
    return (
        not _compile_disabled
        and x.numel() >= COMPILE_MIN_ELEMENTS
        and x.device.type in ("cpu", "cuda")
        and x.is_contiguous()
        and not torch.compiler.is_compiling()  # inside the user's torch.compile: let it fuse
    )


def round_to_grid(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(x * scale) / scale`` for a float tensor ``x`` and a 0-dim ``scale`` of its dtype."""
    ops = fused_cpu_ops(x)
    if ops is not None and scale.device.type == "cpu":
        return ops.round_to_grid(x, scale)
    return round_to_grid_compiled(x, scale)


def round_to_grid_compiled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round_to_grid`` by torch.compile where it pays (see COMPILE_MIN_ELEMENTS), else eager."""
    global _compiled, _compile_disabled
    if not _use_compiled(x):
        return round_to_grid_eager(x, scale)
    try:
        if _compiled is None:
            # dynamic=True and a flat view: one compiled kernel serves every shape.
            _compiled = torch.compile(_round_to_grid_flat, dynamic=True, fullgraph=True)
        return _compiled(x.view(-1), scale).view(x.shape)
    except Exception as error:  # noqa: BLE001 - any compiler failure means: use eager ops
        _compile_disabled = True
        warnings.warn(
            f"torchapprox: torch.compile of the fake-quantization kernel failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); using eager torch ops instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return round_to_grid_eager(x, scale)
