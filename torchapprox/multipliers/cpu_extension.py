"""Build and load the C++ table-matmul kernels (``csrc/approx_matmul_cpu.cpp``), once per torch installation.

The same scheme as ``torchapprox.quantizers.cpu_extension`` (whose helpers this module uses):
the library is keyed on a hash of this source, the flags, Python and the torch installation;
builders hold an ``flock`` (dropped by the OS however the holder dies) for at most
``TORCHAPPROX_BUILD_TIMEOUT`` seconds; each build runs in a scratch folder and the library is
moved into place with one atomic rename. ``TORCHAPPROX_COMPILE=0`` turns the kernels off; a
failed build warns once and the plain torch implementation (``reference.py``) serves the ops,
with the same values. It is a separate library from the quantizer kernels, so either builds
and loads without the other.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

from ..quantizers.cpu_extension import CFLAGS, LDFLAGS, _BuildLock, build_timeout, cache_root, compile_disabled

SOURCE = Path(__file__).with_name("csrc") / "approx_matmul_cpu.cpp"
NAME_PREFIX = "torchapprox_mult_cpu"

_state = "untried"  # "untried" | "loaded" | "unavailable"


def kernels_loaded() -> bool:
    """Load the kernels on first use; True when they serve the ops' CPU calls."""
    global _state
    if _state == "untried":
        _state = "unavailable"
        if not compile_disabled():
            try:
                load()
                _state = "loaded"
            except Exception as error:  # noqa: BLE001 - any build or load failure means: use torch ops
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                warnings.warn(
                    f"torchapprox: the C++ approximate-multiplier kernels could not be built or loaded "
                    f"({type(error).__name__}: {first_line}); using plain torch ops instead (same values, "
                    "much slower). Set TORCHAPPROX_COMPILE=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _state == "loaded"


def build_key() -> str:
    """What the build depends on: source, flags, Python, and the torch installation loaded."""
    torch_install = str(Path(torch.__file__).resolve().parent)
    parts = [SOURCE.read_bytes(), " ".join(CFLAGS + LDFLAGS).encode(), sys.version.encode(),
             platform.machine().encode(),
             torch.__version__.encode(), str(torch.version.git_version).encode(), torch_install.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def library_name() -> str:
    return f"{NAME_PREFIX}_{build_key()}"


def load() -> None:
    """Load the library, building it first if this torch installation has none yet."""
    name = library_name()
    root = cache_root()
    library = root / name / f"{name}.so"
    if not library.exists():
        root.mkdir(parents=True, exist_ok=True)
        with _BuildLock(root / f"{name}.lock", build_timeout()):
            if not library.exists():  # another process may have built it while we waited
                _build_and_load(name, root, library)
                return
    torch.ops.load_library(str(library))


def _build_and_load(name: str, root: Path, library: Path) -> None:
    """Build in a scratch folder (torch loads the library from there), then move it into place."""
    from torch.utils.cpp_extension import load as build_and_load

    for stale in root.glob(f"{name}.build-*"):  # left by killed builds; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    scratch = root / f"{name}.build-{os.getpid()}"
    scratch.mkdir()
    print(f"torchapprox: building the C++ approximate-multiplier kernels, once per torch installation "
          f"(about 30 s), in {library.parent}", file=sys.stderr, flush=True)
    try:
        build_and_load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                       build_directory=str(scratch), is_python_module=False, verbose=False)
        library.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / f"{name}.so", library)  # atomic: nobody sees half a library
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
