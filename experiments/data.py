"""DataModules of the app: digits (the default), synthetic (fast tests), file (your own .npz).

Each splits its tensors into train/val/test with its own fixed seed (``split_seed``), so
that every run of a sweep, whatever its ``seed``, trains and tests on the same split.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`data.{name}` must be an int >= {minimum}, got {value!r}")
    return int(value)


class SplitDataModule(LightningDataModule):
    """Train/val/test loaders over tensors ``x`` (N, C, H, W) and ``y`` (N,) from ``load()``."""

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
                raise ValueError(f"`data.{name}` must be a fraction in (0, 1), got {fraction!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`data.val_fraction` + `data.test_fraction` must be < 1 to leave training data, "
                f"got {val_fraction} + {test_fraction}"
            )
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed = _check_int(split_seed, "split_seed", 0)
        self.in_channels = _check_int(in_channels, "in_channels", 1)
        self.image_size = _check_int(image_size, "image_size", 1)
        self.num_classes = _check_int(num_classes, "num_classes", 2)
        self.num_workers = _check_int(num_workers, "num_workers", 0)
        self.splits: dict[str, TensorDataset] = {}

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y = self.load()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_val, n_test = round(len(y) * self.val_fraction), round(len(y) * self.test_fraction)
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        self.splits = {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class DigitsDataModule(SplitDataModule):
    """scikit-learn's 1797 8x8 handwritten digits, pixel values scaled to [0, 1]."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if (self.in_channels, self.image_size, self.num_classes) != (1, 8, 10):
            raise ValueError(
                "digits are 1 channel, 8x8, 10 classes: `data.in_channels`, `data.image_size`, "
                f"`data.num_classes` must be 1, 8, 10, got {self.in_channels}, {self.image_size}, {self.num_classes}"
            )

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        return x, torch.tensor(labels, dtype=torch.long)


class SyntheticDataModule(SplitDataModule):
    """One random prototype image per class plus Gaussian noise: learnable in a few epochs."""

    def __init__(self, num_samples: int = 256, noise: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_samples = _check_int(num_samples, "num_samples", 10)
        if not isinstance(noise, numbers.Real) or noise < 0:
            raise ValueError(f"`data.noise` must be a number >= 0, got {noise!r}")
        self.noise = float(noise)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.split_seed)
        shape = (self.in_channels, self.image_size, self.image_size)
        prototypes = torch.rand(self.num_classes, *shape, generator=generator)
        y = torch.arange(self.num_samples) % self.num_classes
        x = prototypes[y] + self.noise * torch.randn(self.num_samples, *shape, generator=generator)
        return x, y


class FileDataModule(SplitDataModule):
    """Your own data: an .npz file with ``x`` (N, C, H, W) and integer labels ``y`` (N,).

    The file is read and checked when the module is built, before any training: a file
    that is not an .npz archive, lacks ``x`` or ``y``, holds no samples, NaN or infinite
    values, labels that are not integers in 0..num_classes-1, or too few samples for the
    three splits is refused with one line naming ``data.path``.
    """

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = Path(str(path)).expanduser()
        if not self.path.is_file():  # fail before any training starts
            raise FileNotFoundError(f"`data.path` {str(path)!r} does not exist or is not a file")
        self._arrays = self._read()

    def _refuse(self, reason: str) -> ValueError:
        return ValueError(f"`data.path` {str(self.path)!r}: {reason}")

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            loaded = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise self._refuse(f"not a NumPy .npz file ({str(error).splitlines()[0]})") from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise self._refuse("a single array (.npy), not an .npz archive with arrays `x` and `y` "
                               "(write one with np.savez(path, x=images, y=labels))")
        with loaded as arrays:
            missing = {"x", "y"} - set(arrays.files)
            if missing:
                raise self._refuse(f"lacks the arrays {sorted(missing)} (has {arrays.files})")
            x, y = arrays["x"], arrays["y"]
        if x.size == 0 or y.size == 0 or len(x) == 0:
            raise self._refuse(f"holds no samples (x {x.shape}, y {y.shape})")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise self._refuse(f"x must hold real numbers, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise self._refuse(f"x holds {int((~np.isfinite(x)).sum())} NaN or infinite values")
        if np.issubdtype(y.dtype, np.floating):
            if not np.isfinite(y).all() or (y != np.round(y)).any():
                raise self._refuse("labels y must be integers (class indices), got non-integer values")
        elif not np.issubdtype(y.dtype, np.integer):
            raise self._refuse(f"labels y must be integers (class indices), got dtype {y.dtype}")
        x_t = torch.as_tensor(x, dtype=torch.float32)
        y_t = torch.as_tensor(y).long()
        expected = (self.in_channels, self.image_size, self.image_size)
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != expected or y_t.dim() != 1 or len(y_t) != len(x_t):
            raise self._refuse(
                f"x must be (N, {', '.join(map(str, expected))}) with N labels (from data.in_channels and "
                f"data.image_size), got x {tuple(x_t.shape)} and y {tuple(y_t.shape)}"
            )
        if y_t.min() < 0 or y_t.max() >= self.num_classes:
            raise self._refuse(f"labels must lie in 0..{self.num_classes - 1} (data.num_classes), "
                               f"got {int(y_t.min())}..{int(y_t.max())}")
        n = len(y_t)
        n_val, n_test = round(n * self.val_fraction), round(n * self.test_fraction)
        if min(n_val, n_test, n - n_val - n_test) < 1:
            raise self._refuse(f"holds {n} samples: too few for data.val_fraction={self.val_fraction} and "
                               f"data.test_fraction={self.test_fraction} (every split needs at least one)")
        return x_t, y_t

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._arrays
