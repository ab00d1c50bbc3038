"""Tiny LightningModules, data and probes for the callback tests (CPU, seconds per run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchapprox as ta


def classification_data(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    rule = torch.randn(features, classes, generator=generator)
    return TensorDataset(x, (x @ rule).argmax(dim=1))


class TinyClassifier(LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.05, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._loss(batch)
        self.log("val/loss", loss)
        self.log("val/acc", acc)

    def test_step(self, batch, batch_idx):
        _, acc = self._loss(batch)
        self.log("test/acc", acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(classification_data(seed=0), batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return DataLoader(classification_data(32, seed=1), batch_size=self.hparams.batch_size)

    def test_dataloader(self):
        return self.val_dataloader()


class BitwidthProbe(Callback):
    """Records, from inside the loops, the bitwidths the model's quantizers run at."""

    def __init__(self) -> None:
        self.train: dict[int, set[int]] = {}
        self.val: dict[int, set[int]] = {}
        self.test: set[int] = set()
        self.recording_steps: list[int] = []

    @staticmethod
    def _bits(module) -> set[int]:
        return {q.bitwidth for q in module.modules() if isinstance(q, ta.ApproxQuantizer)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.setdefault(trainer.current_epoch, set()).update(self._bits(pl_module))
        if any(q._collector is not None for q in pl_module.modules() if isinstance(q, ta.ApproxQuantizer)):
            self.recording_steps.append(trainer.global_step)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.setdefault(trainer.current_epoch, set()).update(self._bits(pl_module))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.test.update(self._bits(pl_module))


def make_trainer(tmp_path, callbacks, max_epochs: int = 4, **kwargs) -> Trainer:
    options = dict(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        logger=TensorBoardLogger(str(tmp_path), name="tb", version=kwargs.pop("version", 0)),
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }
