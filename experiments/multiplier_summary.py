"""The multiplier sweep's table and plot: accuracy against each multiplier's error and cost,
with the multiplier dropped into the exactly trained model and after retraining with it.

Each job of the sweep (``+experiment=multiplier_sweep``) trains with exact products and
switches to its multiplier at ``callbacks.approximate.start_epoch``: a job whose run ends
there (``trainer.max_epochs`` = ``start_epoch``) measures the multiplier dropped in, one
that runs on measures it after ``max_epochs - start_epoch`` epochs of retraining. Written
into the sweep dir beside the generic summary:

- ``multipliers.md`` / ``multipliers.csv``: per multiplier its error metrics and cost, and
  the test accuracy (mean ± std over seeds) dropped in and retrained;
- ``multipliers.png``: test accuracy against the multiplier's mean relative error, and
  against its cost where it has one, dropped in and retrained as two series.

Rebuild them at any time: ``python -m experiments.multiplier_summary multirun/<time>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.sweep_summary import collect_jobs, write_table_files

METRIC = "test/acc"


class MultiplierSummary(Callback):
    """Hydra callback: writes the multiplier summary when the sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            summarize(Path(config.hydra.sweep.dir))


def _job_settings(job_dir: Path) -> dict[str, Any] | None:
    """(multiplier config, start epoch, max epochs) of a job, from its saved config."""
    try:
        config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        approximate = config["callbacks"]["approximate"]
        return {"multiplier": approximate["multiplier"], "start": int(approximate["start_epoch"]),
                "epochs": int(config["trainer"]["max_epochs"])}
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _multiplier(config: dict[str, Any]):
    from hydra.utils import instantiate

    return instantiate(config)


def rows_of(sweep_dir: Path, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per multiplier: its metrics, and the accuracies per phase over seeds. The
    jobs not counted (not finished, failed, not a multiplier job) go to ``skipped``."""
    groups: dict[str, dict[str, Any]] = {}
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for job in collect_jobs(sweep_dir):
        settings = _job_settings(sweep_dir / job["job"])
        if settings is None or job["status"] != "ok" or job.get(METRIC) is None:
            if skipped is not None:
                skipped.append(f"{job['job']} ({job['status']}{': ' + job['error'] if job.get('error') else ''})")
            continue
        multiplier = _multiplier(settings["multiplier"])
        if multiplier.name not in groups:
            groups[multiplier.name] = {"multiplier": multiplier.name, "cost": multiplier.cost, **multiplier.metrics()}
        retrain = settings["epochs"] - settings["start"]
        phase = "dropped in" if retrain <= 0 else f"retrained {retrain} epoch{'s' if retrain > 1 else ''}"
        values[(multiplier.name, phase)].append(float(job[METRIC]))
    phases = sorted({phase for _, phase in values}, key=lambda p: (p != "dropped in", p))
    rows = []
    for name, row in sorted(groups.items(), key=lambda item: item[1]["mred"]):
        for phase in phases:
            accuracies = values.get((name, phase), [])
            row[f"{phase} mean"] = statistics.fmean(accuracies) if accuracies else None
            row[f"{phase} std"] = statistics.stdev(accuracies) if len(accuracies) > 1 else None
            row[f"{phase} n"] = len(accuracies)
        rows.append(row)
    return rows


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    skipped: list[str] = []
    rows = rows_of(sweep_dir, skipped)
    if skipped:
        print(f"multiplier summary: {len(skipped)} jobs not counted: {'; '.join(skipped[:10])}", file=sys.stderr)
    if not rows:
        print(f"multiplier summary: no finished multiplier jobs in {sweep_dir}", file=sys.stderr)
        return rows
    write_table_files(sweep_dir, "multipliers", rows, markdown(rows, skipped), lambda path: plot(rows, path))
    print(f"multiplier summary: {sweep_dir / 'multipliers.md'}", flush=True)
    return rows


def _phases(rows: list[dict[str, Any]]) -> list[str]:
    return [key[:-len(" mean")] for key in rows[0] if key.endswith(" mean")]


def markdown(rows: list[dict[str, Any]], skipped: list[str] = ()) -> str:
    phases = _phases(rows)
    lines = [f"# Multipliers: {METRIC} (%, mean ± std over seeds)", "",
             "| multiplier | MRED | error probability | mean error | cost | " + " | ".join(phases) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(phases)]
    for row in rows:
        cost = "n/a" if row["cost"] is None else f"{row['cost']:.3f}"
        cells = []
        for phase in phases:
            mean, std = row[f"{phase} mean"], row[f"{phase} std"]
            spread = "n/a" if std is None else f"{100 * std:.2f}"
            cells.append("" if mean is None else f"{100 * mean:.2f} ± {spread} (n={row[f'{phase} n']})")
        lines.append(f"| {row['multiplier']} | {100 * row['mred']:.2f}% | {row['error_probability']:.3f} | "
                     f"{row['mean_error']:.1f} | {cost} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", f"Not counted ({len(skipped)} jobs): " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_error, by_cost) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for phase, marker in zip(_phases(rows), "os^v"):
        measured = [r for r in rows if r[f"{phase} mean"] is not None]
        for axes, key in ((by_error, "mred"), (by_cost, "cost")):
            points = [r for r in measured if r[key] is not None]
            axes.errorbar([100 * r[key] if key == "mred" else r[key] for r in points],
                          [100 * r[f"{phase} mean"] for r in points],
                          yerr=[100 * (r[f"{phase} std"] or 0.0) for r in points],
                          marker=marker, linestyle="none", capsize=3, label=phase)
            for r in points:
                axes.annotate(r["multiplier"], (100 * r[key] if key == "mred" else r[key], 100 * r[f"{phase} mean"]),
                              fontsize=7, xytext=(3, 3), textcoords="offset points")
    by_error.set_xlabel("mean relative error distance of the multiplier (%)")
    by_cost.set_xlabel("relative cost (partial products kept; designs with a figure)")
    by_error.set_ylabel(f"{METRIC} (%, mean ± std over seeds)")
    for axes in (by_error, by_cost):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("Approximate multipliers: accuracy dropped in and after retraining")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild multipliers.md/.csv/.png of a multiplier sweep dir.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"Error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    return 0 if summarize(args.sweep_dir) else 1


if __name__ == "__main__":
    sys.exit(main())
