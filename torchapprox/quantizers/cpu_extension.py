"""Build and load the C++ CPU kernels (``csrc/minmax_cpu.cpp``), once per torch installation.

The first process that needs them compiles the source with the compiler torch uses for its
own extensions (about 25 s; a line on stderr says so) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``); later processes load the
built library in a fraction of a second.

- The library is keyed on a hash of the source, the flags, the Python version and the torch
  installation actually imported (its version, git revision and path), so two environments
  never share or overwrite each other's build.
- Builders take an ``flock`` on a lock file beside the library. The operating system drops
  it when its holder dies, however it dies, so a killed build never leaves a lock behind:
  the next process builds afresh. A process that waits longer than
  ``TORCHAPPROX_BUILD_TIMEOUT`` seconds (default 600) gives up and uses the plain ops.
- Each build runs in a fresh folder of its own and the finished library is moved into
  place with one atomic rename, so no process ever loads a half-written file.

``TORCHAPPROX_COMPILE=0`` turns the kernels off. If the build fails (no C++ compiler, a
platform the flags do not suit), a warning says so once and the plain torch ops are used
instead: slower, with the same values.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "minmax_cpu.cpp"
NAME_PREFIX = "torchapprox_cpu"
# -fopenmp: at::parallel_for runs on torch's own OpenMP threads; -fopenmp-simd: the
# `omp simd` loops vectorize; no FMA contraction, which would change the rounding.
CFLAGS = ["-O3", "-fopenmp", "-fopenmp-simd", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]
DEFAULT_BUILD_TIMEOUT = 600.0

_state = "untried"  # "untried" | "loaded" | "unavailable"


def compile_disabled() -> bool:
    """True when ``TORCHAPPROX_COMPILE`` is 0/false/no/off: plain torch ops only."""
    return os.environ.get("TORCHAPPROX_COMPILE", "1").strip().lower() in ("0", "false", "no", "off")


def kernels_loaded() -> bool:
    """Load the CPU kernels on first use; True when they serve the ops' CPU calls."""
    global _state
    _state = load_once(_state, SOURCE, NAME_PREFIX, "C++ CPU kernels", "slower")
    return _state == "loaded"


def load_once(state: str, source: Path, prefix: str, what: str, cost: str, seconds: int = 25) -> str:
    """The next state of a library of kernels that loads on first use: ``"loaded"`` or
    ``"unavailable"`` once tried (a failure warns once), ``state`` itself once decided."""
    if state != "untried":
        return state
    if compile_disabled():
        return "unavailable"
    try:
        load(source, prefix, what, seconds)
        return "loaded"
    except Exception as error:  # noqa: BLE001 - any build or load failure means: use torch ops
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(
            f"torchapprox: the {what} could not be built or loaded ({type(error).__name__}: {first_line}); "
            f"using plain torch ops instead (same values, {cost}). Set TORCHAPPROX_COMPILE=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=4,
        )
        return "unavailable"


def build_key(source: Path | None = None) -> str:
    """What the build depends on: source, flags, Python, and the torch installation loaded."""
    torch_install = str(Path(torch.__file__).resolve().parent)
    parts = [(source or SOURCE).read_bytes(), " ".join(CFLAGS + LDFLAGS).encode(), sys.version.encode(),
             platform.machine().encode(), torch.__version__.encode(), str(torch.version.git_version).encode(),
             torch_install.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def cache_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def build_timeout() -> float:
    value = os.environ.get("TORCHAPPROX_BUILD_TIMEOUT", "")
    try:
        return float(value) if value.strip() else DEFAULT_BUILD_TIMEOUT
    except ValueError:
        raise ValueError(f"TORCHAPPROX_BUILD_TIMEOUT must be a number of seconds, got {value!r}") from None


def load(source: Path | None = None, prefix: str | None = None, what: str = "C++ CPU kernels",
         seconds: int = 25) -> None:
    """Load the library of ``source``, building it first if this torch installation has none yet."""
    source = source or SOURCE
    name = f"{prefix or NAME_PREFIX}_{build_key(source)}"
    root = cache_root()
    library = root / name / f"{name}.so"
    if not library.exists():
        root.mkdir(parents=True, exist_ok=True)
        with _BuildLock(root / f"{name}.lock", build_timeout()):
            if not library.exists():  # another process may have built it while we waited
                _build_and_load(name, root, library, source, what, seconds)
                return
    torch.ops.load_library(str(library))


def _build_and_load(name: str, root: Path, library: Path, source: Path, what: str, seconds: int) -> None:
    """Build in a scratch folder (torch loads the library from there), then move it into place."""
    from torch.utils.cpp_extension import load as build_and_load

    for stale in root.glob(f"{name}.build-*"):  # left by killed builds; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    scratch = root / f"{name}.build-{os.getpid()}"
    scratch.mkdir()
    print(f"torchapprox: building the {what}, once per torch installation (about {seconds} s), in "
          f"{library.parent}", file=sys.stderr, flush=True)
    try:
        # Copies: torch's load() appends its own flags to the lists it is given.
        build_and_load(name=name, sources=[str(source)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                       build_directory=str(scratch), is_python_module=False, verbose=False)
        library.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / f"{name}.so", library)  # atomic: nobody sees half a library
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _BuildLock:
    """An exclusive ``flock`` on ``path``, waited for at most ``timeout`` seconds."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path, self.timeout, self.handle = path, timeout, None

    def __enter__(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: builds are not serialised, each in its own folder
            return
        self.handle = open(self.path, "a+")  # noqa: SIM115 - held until __exit__
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.handle.close()
                    raise TimeoutError(
                        f"another process has been building the kernels for over {self.timeout:.0f} s "
                        f"(lock {self.path}; TORCHAPPROX_BUILD_TIMEOUT sets the wait)"
                    ) from None
                time.sleep(0.2)

    def __exit__(self, *exc_info) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
