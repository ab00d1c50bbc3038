"""A small decoder-only Transformer over bytes, and the LightningModule that trains it.

``CharTransformer``: byte embedding + learned positions, ``layers`` pre-norm blocks
(``nn.MultiheadAttention`` with a causal mask, then a GELU MLP), a final LayerNorm and an
LM head whose weight is the byte embedding's (tied, as in GPT-2). Every layer is a torch.nn
layer torchapprox quantizes: embeddings, attention, linear layers.

``LanguageModel`` logs ``train/loss``, ``val/loss``, ``val/bpb`` and ``test/bpb``: bits per
byte, the cross-entropy in nats divided by ln 2, averaged over every predicted byte.
AdamW (weight decay on matrices only) with a linear warm-up and a cosine decay over the run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

LN2 = math.log(2.0)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """Bytes in, next-byte logits out: ``(B, T)`` int64 -> ``(B, T, 256)``, T <= ``context``."""

    def __init__(self, context: int = 64, dim: int = 64, layers: int = 2, heads: int = 4, mlp_ratio: int = 4,
                 dropout: float = 0.0, vocab: int = 256) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"`model.net.dim` ({dim}) must be a multiple of `model.net.heads` ({heads})")
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        x = self.embed(ids) + self.position(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


class LanguageModel(LightningModule):
    """Trains ``net`` to predict the next byte (see the module docstring)."""

    def __init__(self, net: nn.Module, lr: float = 3e-3, weight_decay: float = 0.1, warmup_steps: int = 50,
                 min_lr_ratio: float = 0.1) -> None:
        super().__init__()
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise ValueError(f"`model.lr` must be a number > 0, got {lr!r}")
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"`model.weight_decay` must be a number >= 0, got {weight_decay!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`model.warmup_steps` must be an int >= 0, got {warmup_steps!r}")
        if not isinstance(min_lr_ratio, (int, float)) or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"`model.min_lr_ratio` must be a number in [0, 1], got {min_lr_ratio!r}")
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.net = net

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def _loss(self, batch) -> tuple[torch.Tensor, int]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), y.numel()

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def _evaluate(self, batch, stage: str) -> None:
        loss, count = self._loss(batch)
        # weighted by the bytes in the batch: the mean over every predicted byte of the split
        self.log(f"{stage}/loss", loss, batch_size=count, sync_dist=True)
        self.log(f"{stage}/bpb", loss / LN2, batch_size=count, prog_bar=True, sync_dist=True)

    @torch.no_grad()
    def evaluate(self, loader, stage: str = "test") -> dict[str, float]:
        """Loss and bits per byte over every byte of ``loader``, in this process alone."""
        was_training = self.training
        self.eval()
        total, count = 0.0, 0
        for x, y in loader:
            logits = self(x.to(self.device))
            total += float(F.cross_entropy(logits.flatten(0, 1), y.to(self.device).flatten(), reduction="sum"))
            count += y.numel()
        self.train(was_training)
        return {f"{stage}/loss": total / count, f"{stage}/bpb": total / count / LN2}

    def configure_optimizers(self):
        matrices = [p for p in self.parameters() if p.dim() >= 2]
        others = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": self.hparams.weight_decay},
                                       {"params": others, "weight_decay": 0.0}], lr=self.hparams.lr,
                                      betas=(0.9, 0.95))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup, floor = self.hparams.warmup_steps, self.hparams.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
