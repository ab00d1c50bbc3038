"""Run by test_callback_ddp.py: QAT on 2 CPU processes (gloo); each rank saves what it computed.

Usage: python tests/ddp_check.py STRATEGY OUT_DIR
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import QuantizationAwareTraining
from lit_helpers import TinyClassifier


class SaveQuantizedWeights(Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            saved = {
                name: layer.weight_quantizer(layer.weight).clone()
                for name, layer in (("net.0", pl_module.net[0]), ("net.2", pl_module.net[2]))
            }
        saved["bitwidth"] = pl_module.net[0].weight_quantizer.bitwidth
        torch.save(saved, self.out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    strategy, out_dir = sys.argv[1], Path(sys.argv[2])
    seed_everything(0, verbose=False)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        logger=TensorBoardLogger(str(out_dir), name="tb", version=0),
        callbacks=[QuantizationAwareTraining({0: 8, 1: 4}, log_every_n_steps=1), SaveQuantizedWeights(out_dir)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(TinyClassifier())
