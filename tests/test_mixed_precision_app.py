"""Mixed precision from the shell (issue 23): the config group, precision metrics in
metrics.json, and the sweep's Pareto summary. Real subprocesses."""

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


def test_a_mixed_precision_sweep_records_precision_and_writes_its_pareto_summary(tmp_path):
    sweep = tmp_path / "sweep"
    result = run("experiments.train", "+experiment=mixed_precision", "data=synthetic", "trainer.max_epochs=2",
                 "hydra.sweeper.params={callbacks.mixed_precision.method: 'uniform,hessian', "
                 "callbacks.mixed_precision.budget: '3,4', seed: '0,1'}", f"hydra.sweep.dir={sweep}", *QUIET,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {}
    for job in sweep.iterdir():
        if (job / "metrics.json").is_file():
            config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["callbacks"]["mixed_precision"]
            metrics = json.loads((job / "metrics.json").read_text())
            jobs.setdefault((config["method"], float(config["budget"])), []).append(metrics)
    assert len(jobs) == 4 and all(len(v) == 2 for v in jobs.values())
    for (method, budget), members in jobs.items():
        for metrics in members:
            assert metrics["precision/average_bits"] <= budget + 1e-9
            assert metrics["precision/size_bytes"] > 0 and metrics["precision/bit_operations"] > 0
            if method == "uniform":
                assert metrics["precision/average_bits"] == budget
    rows = list(csv.DictReader((sweep / "precision.csv").open()))
    assert len(rows) == 4 and (sweep / "precision.png").stat().st_size > 0
    for row in rows:
        members = jobs[(row["method"], float(row["budget"]))]
        assert abs(float(row["mean"]) - sum(m["test/acc"] for m in members) / 2) < 1e-9
        assert abs(float(row["average_bits"]) - sum(m["precision/average_bits"] for m in members) / 2) < 1e-9
    assert "| uniform | 3 | 3.000 |" in (sweep / "precision.md").read_text()


def test_a_bad_budget_stops_the_run_in_one_line(tmp_path):
    result = run("experiments.train", "data=synthetic", "trainer.max_epochs=2", "schedule=constant", "bits=8",
                 "+mixed_precision=default", "callbacks.mixed_precision.budget=1.5", f"hydra.run.dir={tmp_path}/run",
                 *QUIET, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "budget 1.5 (weights) is infeasible: the smallest feasible budget with choices [2, 3, 4, 8] is 2" in last


def test_the_sensitivity_command_compares_both_methods_on_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    trained = run("experiments.train", "data=synthetic", "schedule=constant", "bits=8", "trainer.max_epochs=1",
                  f"hydra.run.dir={run_dir}", *QUIET, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = run("experiments.sensitivity", str(run_dir), "--batches", "2", "--bits", "2", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run_dir / "sensitivity.json").read_text())
    layers = {"net.features.0", "net.features.3", "net.features.6", "net.classifier"}
    assert set(saved["hessian"]["values"]) == set(saved["direct"]["values"]) == layers
    assert -1 <= saved["rank_correlation"] <= 1 and saved["batches"] == 2
    assert "rank correlation (Spearman), hessian against direct" in result.stdout
    missing = run("experiments.sensitivity", str(tmp_path / "nothing"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("Error:")
