"""Run directories: one run at a time in each, and nothing already written is overwritten.

- A run claims its directory with an ``flock`` on ``.run.lock``, held until the process
  ends (the system drops it however the process dies): a second run started on the same
  ``hydra.run.dir`` finds it held and stops with one line.
- Hydra writes the job's config (``.hydra/``) before the app runs. ``hydra.output_subdir``
  is resolved by :func:`config_subdir`, which keeps that first write off what a previous
  run left: a directory holding a finished run (``metrics.json``) gets the new config in a
  temporary folder, outside it; a directory holding an unfinished run (resumed in place)
  gets it in ``.hydra-<time>``, beside the first attempt's ``.hydra``.
- A sweep names each job's directory after its overrides (:func:`job_dir_name`), so a
  sweep re-run into the same sweep dir finds each finished job under its own name and
  skips it, and runs only the jobs that are missing or did not finish.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

METRICS_FILE = "metrics.json"
FAILURE_FILE = "failed.json"
INTERRUPTED_FILE = "interrupted.json"
LOCK_FILE = ".run.lock"

_claims: dict[str, object] = {}  # run dir -> the open lock file this process holds


def finished(run_dir: Path) -> bool:
    return (Path(run_dir) / METRICS_FILE).is_file()


def claim(run_dir: Path) -> bool:
    """Take ``run_dir``'s lock for the rest of this process; False if another process has it."""
    key = str(Path(run_dir).resolve())
    if key in _claims:
        return True
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        _claims[key] = None
        return True
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(run_dir) / LOCK_FILE, "a+")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _claims[key] = handle
    return True


def holder(run_dir: Path) -> str:
    """The process id written by the run holding ``run_dir``'s lock, if readable."""
    try:
        return (Path(run_dir) / LOCK_FILE).read_text().strip() or "?"
    except OSError:
        return "?"


def config_subdir(*, _root_) -> str:
    """Resolver of ``hydra.output_subdir`` (see the module docstring)."""
    run_dir = Path(str(_root_.hydra.runtime.output_dir))
    if finished(run_dir) or not claim(run_dir):
        # Not ours to write into: the job stops with a clear line, its config goes elsewhere.
        return tempfile.mkdtemp(prefix="torchapprox-not-run-")
    if (run_dir / ".hydra").exists():
        return f".hydra-{time.strftime('%Y-%m-%d_%H-%M-%S')}"  # a new attempt beside the first
    return ".hydra"


def job_dir_name(override_dirname: str, job_num: int) -> str:
    """A sweep job's directory: its overrides (``bits=2,seed=0``), made a safe file name."""
    name = str(override_dirname).replace(os.sep, "_").strip() or f"job{job_num}"
    return name if len(name) <= 200 else f"{name[:180]}...job{job_num}"
