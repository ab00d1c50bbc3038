"""The standard library's own source as a byte-level language-modelling corpus (no download).

The corpus: the top-level ``*.py`` files of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``), in sorted file-name order, concatenated, cut to the
first ``max_bytes`` bytes. The vocabulary is the 256 byte values. The split is contiguous:
the first 90% trains, the next 5% validates, the last 5% tests (``val_fraction``,
``test_fraction``). Every Python installation of the same version ships the same bytes; the
corpus' SHA-256 is logged so that results say which they were computed on.

Training batches are windows of ``context + 1`` bytes at random offsets (a fixed number per
epoch, drawn from the run's seed); evaluation covers its split once, in consecutive
windows, so each of its bytes (but the first of each window) is predicted exactly once.
"""

from __future__ import annotations

import hashlib
import numbers
import sysconfig
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`data.{name}` must be an int >= {minimum}, got {value!r}")
    return int(value)


def stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)


def stdlib_corpus(max_bytes: int) -> bytes:
    """The first ``max_bytes`` bytes of the standard library's top-level modules, in name order."""
    chunks, size = [], 0
    for path in stdlib_files():
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


class RandomWindows(Dataset):
    """``count`` windows of ``context + 1`` bytes at offsets drawn from ``seed``: item i is
    always the same window (so a shuffled loader with the run's seed is reproducible)."""

    def __init__(self, data: torch.Tensor, context: int, count: int, seed: int) -> None:
        self.data, self.context, self.count = data, context, count
        generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(data) - context - 1, (count,), generator=generator)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.data[self.offsets[index]: self.offsets[index] + self.context + 1]
        return window[:-1], window[1:]


class ConsecutiveWindows(Dataset):
    """The split cut into consecutive windows of ``context + 1`` bytes (the last byte of one
    window is the first of the next): every byte after the first is a target once."""

    def __init__(self, data: torch.Tensor, context: int) -> None:
        self.data, self.context = data, context
        self.count = max((len(data) - 1) // context, 1)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.context
        window = self.data[start: start + self.context + 1]
        return window[:-1], window[1:]


class StdlibTextDataModule(LightningDataModule):
    """Byte-level text from the standard library's source (see the module docstring)."""

    def __init__(self, max_bytes: int = 2_000_000, context: int = 64, batch_size: int = 32,
                 windows_per_epoch: int = 3200, val_fraction: float = 0.05, test_fraction: float = 0.05,
                 split_seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.max_bytes = _check_int(max_bytes, "max_bytes", 10_000)
        self.context = _check_int(context, "context", 2)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.windows_per_epoch = _check_int(windows_per_epoch, "windows_per_epoch", 1)
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(fraction, numbers.Real) or not 0 < fraction < 0.5:
                raise ValueError(f"`data.{name}` must be a fraction in (0, 0.5), got {fraction!r}")
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = _check_int(split_seed, "split_seed", 0)
        self.num_workers = _check_int(num_workers, "num_workers", 0)
        self.splits: dict[str, torch.Tensor] = {}
        self.sha256 = ""

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        corpus = stdlib_corpus(self.max_bytes)
        if len(corpus) < self.max_bytes:
            raise ValueError(f"`data.max_bytes` {self.max_bytes}: this Python's standard library holds only "
                             f"{len(corpus)} bytes of top-level modules")
        self.sha256 = hashlib.sha256(corpus).hexdigest()
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        n_val, n_test = round(len(data) * self.val_fraction), round(len(data) * self.test_fraction)
        n_train = len(data) - n_val - n_test
        self.splits = {"train": data[:n_train], "val": data[n_train:n_train + n_val], "test": data[n_train + n_val:]}
        if min(len(split) for split in self.splits.values()) <= self.context + 1:
            raise ValueError(f"`data.context` {self.context} is longer than a split of {self.max_bytes} bytes")

    def train_dataloader(self) -> DataLoader:
        windows = RandomWindows(self.splits["train"], self.context, self.windows_per_epoch, self.split_seed)
        return DataLoader(windows, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=True)

    def _evaluation(self, split: str) -> DataLoader:
        return DataLoader(ConsecutiveWindows(self.splits[split], self.context), batch_size=self.batch_size,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation("test")
