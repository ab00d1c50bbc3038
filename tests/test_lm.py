"""The byte-level language model: its corpus and split, its model, a short training run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
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
    # Per-token input scales export as float ops: ONNX Runtime's bits per byte equal PyTorch's.
    export = subprocess.run([sys.executable, "-m", "experiments.export", str(run_dir)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert export.returncode == 0, export.stderr[-2000:]
    line = next(line for line in export.stdout.splitlines() if line.startswith("test bits per byte"))
    onnx_bpb = float(line.split("ONNX Runtime ")[1].split(",")[0])
    torch_bpb = float(line.split("PyTorch ")[1].split(",")[0])
    assert onnx_bpb == pytest.approx(torch_bpb, abs=1e-3)
    assert torch_bpb == pytest.approx(metrics["test/bpb"], abs=1e-3)
    assert "one scale per token" in export.stdout and (run_dir / "model.onnx").is_file()


def test_per_token_inputs_and_calibration_are_refused_together_before_training():
    from callbacks import QuantizationAwareTraining

    with pytest.raises(ValueError, match=r"`calibrate_batches=2` freezes one range per input tensor, but "
                                         r"`per_token_inputs=True`"):
        QuantizationAwareTraining(4, per_token_inputs=True, calibrate_batches=2)


def test_the_summary_shows_bits_per_byte_as_they_are():
    rows = [{"job": str(i), "status": "ok", "parsed": {"bits": str(b), "seed": str(s)}, "val/bpb": v, "bitwidth": b}
            for i, (b, s, v) in enumerate([(4, 0, 2.5), (4, 1, 2.7), (8, 0, 2.4), (8, 1, 2.4)])]
    lines = _pivot(aggregate(rows, "val/bpb"), "val/bpb")
    assert "| all jobs | 2.600 ± 0.141 | 2.400 ± 0.000 |" in lines


def test_fp32_jobs_repeated_for_every_bitwidth_count_once_per_seed():
    """An fp32 job ignores `bits`: a sweep over bits runs it again per value. The pooled fp32
    entry is the mean ± std of one value per seed, not of the copies."""
    rows = [{"job": f"{b}-{s}", "status": "ok", "parsed": {"recipe": "fp32", "bits": str(b), "seed": str(s)},
             "test/acc": value, "bitwidth": None}
            for b in (2, 4, 8) for s, value in ((0, 0.98), (1, 0.99), (2, 1.0))]
    lines = _pivot(aggregate(rows, "test/acc"), "test/acc")
    assert "| all jobs | 99.00 ± 1.00 |" in lines  # stdev of three seeds; twelve copies would give 0.87


def test_the_summary_command_uses_the_sweeps_metric_and_refuses_an_unknown_one(tmp_path):
    from experiments.sweep_summary import main

    sweep = tmp_path / "sweep"
    for seed, bpb in ((0, 2.5), (1, 2.7)):
        job = sweep / f"seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
        (job / "metrics.json").write_text(json.dumps({"status": "ok", "val/bpb": bpb, "test/bpb": bpb, "bitwidth": 4}))
    (sweep / "multirun.yaml").write_text("hydra:\n  callbacks:\n    sweep_summary:\n      metric: val/bpb\n")
    assert main([str(sweep)]) == 0
    assert "## val/bpb: mean ± std over seeds" in (sweep / "summary.md").read_text()
    before = (sweep / "summary.csv").stat().st_mtime_ns
    assert main([str(sweep), "--metric", "test/acc"]) == 2  # one line, nothing rewritten
    assert (sweep / "summary.csv").stat().st_mtime_ns == before


def test_the_export_command_takes_classifiers_and_the_language_model(tmp_path):
    from experiments.export import unexportable

    model = LanguageModel(CharTransformer(context=8, dim=16, layers=1, heads=2))
    ta.attach(model, 4)
    assert unexportable(model, tmp_path) is None  # measured in bits per byte
    other = nn.Sequential(nn.Linear(2, 2))
    assert "neither a classifier nor the language model" in unexportable(other, tmp_path)
