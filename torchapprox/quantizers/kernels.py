"""The elementwise work of fake quantization: ``round(x * scale) / scale``.

Eager torch runs it as three passes over memory (multiply, round, divide). For large
contiguous tensors on CPU or CUDA a ``torch.compile``d kernel does it in one pass, with the
same operations in the same order, so the numbers are identical (the tests check this).
Small tensors stay eager: a compiled call costs tens of microseconds of dispatch.

``TORCHAPPROX_COMPILE=0`` turns compilation off. If it fails (no C++ compiler, an
unsupported platform), a warning says so once and the eager ops are used from then on.
"""

from __future__ import annotations

import os
import warnings

import torch

# Below this, the ~60 us a compiled call costs in dispatch outweighs the two passes it saves
# (measured on a 2-core CPU: equal at about 2**19 elements, 1.5x faster at 2**20).
COMPILE_MIN_ELEMENTS = 1 << 20

_compiled = None
_compile_disabled = os.environ.get("TORCHAPPROX_COMPILE", "1").lower() in ("0", "false", "no", "off")


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
    """``round(x * scale) / scale`` for a float tensor ``x`` and a 0-dim ``scale``."""
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
