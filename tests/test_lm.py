"""The byte-level language model: its corpus and split, its model, a short training run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

import torchapprox as ta
from experiments.lm import CharTransformer, LanguageModel
from experiments.sweep_summary import _pivot, aggregate
from experiments.text_data import ConsecutiveWindows, RandomWindows, StdlibTextDataModule, stdlib_files

ROOT = Path(__file__).resolve().parents[1]


def data(**kwargs):
    module = StdlibTextDataModule(**{"max_bytes": 200_000, "context": 32, "batch_size": 8, **kwargs})
    module.setup()
    return module


def test_the_corpus_is_the_stdlib_source_in_name_order_and_the_split_is_fixed():
    first, second = data(), data()
    assert first.sha256 == second.sha256 and len(first.sha256) == 64
    for name in ("train", "val", "test"):
        assert torch.equal(first.splits[name], second.splits[name])
    sizes = {name: len(split) for name, split in first.splits.items()}
    assert sizes == {"train": 180_000, "val": 10_000, "test": 10_000}
    files = stdlib_files()
    assert [f.name for f in files] == sorted(f.name for f in files)
    head = files[0].read_bytes()[:1000]
    assert bytes(first.splits["train"][:1000].tolist()) == head
    joined = torch.cat([first.splits["train"], first.splits["val"], first.splits["test"]])
    assert int(joined.max()) < 256 and joined.dtype == torch.int64


def test_windows_are_reproducible_and_evaluation_predicts_each_byte_once():
    split = torch.arange(1000) % 256
    windows = RandomWindows(split, context=16, count=50, seed=3)
    again = RandomWindows(split, context=16, count=50, seed=3)
    x, y = windows[7]
    assert torch.equal(x, again[7][0]) and torch.equal(y[:-1], x[1:])  # targets are the next bytes
    consecutive = ConsecutiveWindows(split, context=16)
    targets = torch.cat([consecutive[i][1] for i in range(len(consecutive))])
    assert torch.equal(targets, split[1:1 + len(targets)]) and len(targets) == 16 * (999 // 16)


def test_the_model_is_causal_tied_and_fully_quantized():
    torch.manual_seed(0)
    net = CharTransformer(context=16, dim=32, layers=2, heads=4)
    ids = torch.randint(0, 256, (2, 16))
    logits = net(ids)
    assert logits.shape == (2, 16, 256)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    assert torch.allclose(net(changed)[:, :10], logits[:, :10], atol=1e-6)  # the past ignores the future
    assert net.head.weight is net.embed.weight
    names = ta.attach(net, 4)
    assert {"embed", "position", "head", "blocks.0.attn", "blocks.0.attn.out_proj", "blocks.1.mlp.2"} <= set(names)
    assert net.head.weight_quantizer is net.embed.weight_quantizer  # the tied weight, one quantizer
    assert sum(r["quantized_share"] for r in ta.coverage(net)) > 0.97
    quantized = net(changed)
    assert quantized.shape == logits.shape and not torch.allclose(quantized, logits)


def test_a_few_training_steps_lower_the_loss_and_bpb_is_loss_over_ln2():
    seed_everything(0, verbose=False)
    module = data(windows_per_epoch=8 * 40)
    model = LanguageModel(CharTransformer(context=32, dim=32, layers=1, heads=2), lr=3e-3, warmup_steps=5)
    batch = next(iter(module.val_dataloader()))
    with torch.no_grad():
        before = F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten()).item()
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                      accelerator="cpu", enable_model_summary=False)
    trainer.fit(model, datamodule=module)
    with torch.no_grad():
        after = F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten()).item()
    assert after < before - 0.5  # from ~ln 256 = 5.5 nats towards the byte statistics
    tested = trainer.test(model, datamodule=module, verbose=False)[0]
    assert tested["test/bpb"] == pytest.approx(tested["test/loss"] / math.log(2), rel=1e-5)
    direct = model.evaluate(module.test_dataloader())
    assert direct["test/bpb"] == pytest.approx(tested["test/bpb"], rel=1e-4)


def test_the_app_trains_the_language_model_and_reports_bits_per_byte(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "+experiment=lm", "trainer.max_epochs=2",
         "data.max_bytes=200000", "data.windows_per_epoch=256", "+recipe=lm_lowbit", "bits=4", "~callbacks.progress_bar",
         "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 < metrics["val/bpb"] < 8 and 0 < metrics["test/bpb"] < 8 and metrics["bitwidth"] == 4
    assert list((run_dir / "checkpoints").glob("epoch01.ckpt"))  # the best epoch by val/bpb (lower is better)


def test_the_summary_shows_bits_per_byte_as_they_are():
    rows = [{"job": str(i), "status": "ok", "parsed": {"bits": str(b), "seed": str(s)}, "val/bpb": v, "bitwidth": b}
            for i, (b, s, v) in enumerate([(4, 0, 2.5), (4, 1, 2.7), (8, 0, 2.4), (8, 1, 2.4)])]
    lines = _pivot(aggregate(rows, "val/bpb"), "val/bpb")
    assert "| all jobs | 2.600 ± 0.141 | 2.400 ± 0.000 |" in lines
