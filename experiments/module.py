"""Classifier: the LightningModule the app trains (cross-entropy, Adam, torchmetrics accuracy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class Classifier(LightningModule):
    """Trains any ``net`` mapping a batch of images to class logits.

    Logs ``train/loss``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc``.
    """

    def __init__(self, net: nn.Module, num_classes: int | None = None, lr: float = 3e-3, weight_decay: float = 0.0,
                 lr_schedule: str = "constant") -> None:
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"`model.lr_schedule` must be 'constant' or 'cosine', got {lr_schedule!r}")
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise ValueError(f"`model.lr` must be a number > 0, got {lr!r}")
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"`model.weight_decay` must be a number >= 0, got {weight_decay!r}")
        # Plain numbers only (the net is a module, not a hyperparameter): checkpoints must
        # load with torch.load(weights_only=True). The app logs the whole config itself.
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.net = net
        classes = num_classes or _output_features(net)
        self.val_acc = MulticlassAccuracy(classes, average="micro")
        self.test_acc = MulticlassAccuracy(classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)

    @torch.no_grad()
    def evaluate(self, loader, stage: str = "test") -> dict[str, float]:
        """Accuracy and mean cross-entropy over every sample of ``loader``, in this process
        alone (no distributed sampler, which would pad the set with repeated samples)."""
        was_training = self.training
        self.eval()
        correct, loss, count = 0, 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            logits = self(x)
            correct += int((logits.argmax(dim=1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            count += len(y)
        self.train(was_training)
        return {f"{stage}/acc": correct / count, f"{stage}/loss": loss / count}

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        # cosine: from lr down to 0 over the whole run, stepped per epoch
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def _output_features(net: nn.Module) -> int:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("`num_classes` must be given for a net without a final nn.Linear")
    return linears[-1].out_features
