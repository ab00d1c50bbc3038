"""Checkpoint writes that are atomic: a full disk or a kill mid-write leaves the previous
checkpoint in place, never a truncated one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, writing into a temporary file beside the target and
    renaming it over the target once complete (a rename within a directory is atomic)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, temporary, storage_options)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)  # no half-written file left behind
            raise
