"""Run by test_callback_ddp.py: QAT on 2 CPU processes (gloo); each rank saves what it computed.

Usage: python tests/ddp_check.py MODE STRATEGY OUT_DIR
MODE: "weights" (a step anneal), "running" (running input ranges), "calibrated" (static ranges
frozen at the end), "branch" (a layer that runs on rank 0 only, statistics every step).
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import torchapprox as ta
from callbacks import QuantizationAwareTraining
from lit_helpers import TinyClassifier


class SaveWhatRanksHold(Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            saved = {
                name: layer.weight_quantizer(layer.weight).clone()
                for name, layer in (("net.0", pl_module.net[0]), ("net.2", pl_module.net[2]))
            }
        saved["bitwidth"] = pl_module.net[0].weight_quantizer.bitwidth
        saved["ranges"] = ta.quantizer_state(pl_module)
        torch.save(saved, self.out_dir / f"rank{trainer.global_rank}.pt")


class RankBranch(TinyClassifier):
    """A layer only rank zero runs: its statistics exist on one rank only."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(3, 3)

    def forward(self, x):
        out = self.net(x)
        return self.extra(out) if self.global_rank == 0 else out + 0.0 * sum(p.sum() for p in self.extra.parameters())


if __name__ == "__main__":
    mode, strategy, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    seed_everything(0, verbose=False)
    options = {"weights": dict(schedule={0: 8, 1: 4}),
               "running": dict(schedule=4, eval_range="running"),
               "calibrated": dict(schedule=4, calibrate_batches=2),
               "branch": dict(schedule=4)}[mode]
    schedule = options.pop("schedule")
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        logger=TensorBoardLogger(str(out_dir), name="tb", version=0),
        callbacks=[QuantizationAwareTraining(schedule, log_every_n_steps=1, verbose=False, **options),
                   SaveWhatRanksHold(out_dir), ModelCheckpoint(dirpath=out_dir / "ckpt", save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(RankBranch() if mode == "branch" else TinyClassifier())
