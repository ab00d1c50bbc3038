"""Approximate multipliers from the shell (issue 22): the `multiplier` config group, a sweep's
multiplier summary, and `experiments.export` of a run with multipliers. Real subprocesses."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]


def run(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_multiplier_sweep_writes_its_table_from_the_jobs_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    result = run("experiments.train", "-m", "data=synthetic", "schedule=constant", "bits=8",
                 "+multiplier=drum4,exact", "callbacks.approximate.start_epoch=choice(1)", "trainer.max_epochs=1,2",
                 "seed=0,1", "+hydra.callbacks.multiplier_summary._target_=experiments.multiplier_summary.MultiplierSummary",
                 f"hydra.sweep.dir={sweep}", *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected: dict[tuple[str, str], list[float]] = {}
    for job in sweep.iterdir():
        if not (job / "metrics.json").is_file():
            continue
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        name = {"drum": "drum(4)", "exact": "exact"}[config["callbacks"]["approximate"]["multiplier"]["_target_"]
                                                     .rsplit(".", 1)[1]]
        phase = "dropped in" if config["trainer"]["max_epochs"] == 1 else "retrained 1 epoch"
        expected.setdefault((name, phase), []).append(json.loads((job / "metrics.json").read_text())["test/acc"])
    rows = {row["multiplier"]: row for row in csv.DictReader((sweep / "multipliers.csv").open())}
    assert set(rows) == {"drum(4)", "exact"} and (sweep / "multipliers.png").stat().st_size > 0
    for (name, phase), values in expected.items():
        assert len(values) == 2 and int(rows[name][f"{phase} n"]) == 2
        assert abs(float(rows[name][f"{phase} mean"]) - sum(values) / 2) < 1e-9
    assert float(rows["drum(4)"]["mred"]) > 0.05 and float(rows["exact"]["mred"]) == 0.0
    assert "| drum(4) | 5.86% |" in (sweep / "multipliers.md").read_text()


def test_export_of_a_run_with_multipliers_refuses_or_writes_the_assignment(tmp_path):
    run_dir = tmp_path / "run"
    result = run("experiments.train", "data=synthetic", "schedule=constant", "bits=8", "trainer.max_epochs=1",
                 "+multiplier=mitchell", f"hydra.run.dir={run_dir}", *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    refused = run("experiments.export", str(run_dir), cwd=tmp_path)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ONNX cannot express an approximate product") and "(mitchell)" in last
    assert "--exact-products" in last and not (run_dir / "model.onnx").exists()
    exported = run("experiments.export", str(run_dir), "--exact-products", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assignment = json.loads((run_dir / "multipliers.json").read_text())
    assert set(assignment) == {"net.features.0", "net.features.3", "net.features.6", "net.classifier"}
    assert {entry["multiplier"] for entry in assignment.values()} == {"mitchell"}
    assert all(0.03 < entry["mred"] < 0.05 and len(entry["table_sha256"]) == 64 for entry in assignment.values())
    assert (run_dir / "model.onnx").stat().st_size > 0


def test_the_summary_lists_jobs_it_could_not_count_and_survives_a_corrupt_metrics_file(tmp_path):
    sweep = tmp_path / "sweep"
    result = run("experiments.train", "-m", "data=synthetic", "schedule=constant", "bits=8", "+multiplier=drum4",
                 "callbacks.approximate.start_epoch=choice(1)", "trainer.max_epochs=1", "seed=0,1",
                 f"hydra.sweep.dir={sweep}", *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    broken = sorted(j for j in sweep.iterdir() if (j / "metrics.json").is_file())[0]
    (broken / "metrics.json").write_text('{"status": "ok", "test/ac')
    rebuilt = run("experiments.multiplier_summary", str(sweep), cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    text = (sweep / "multipliers.md").read_text()
    assert "(n=1)" in text and "± n/a" in text
    assert f"Not counted (1 jobs): {broken.name} (failed: metrics.json is not readable JSON" in text
