"""The mixed-precision sweep's table and Pareto plot: the metric against model size and
against bit-operations, uniform bitwidths and assigned ones as two series.

Each job of ``+experiment=mixed_precision`` (or ``lm_mixed_precision``) runs the
``MixedPrecision`` callback with a budget and a method (``uniform`` or an assignment) and
records ``precision/{average_bits, size_bytes, bit_operations}`` in its metrics.json. Written
into the sweep dir beside the generic summary: ``precision.md`` / ``precision.csv`` (per
method and budget: achieved average bits, size, bit-operations and the metric, mean ± std
over seeds) and ``precision.png`` (the Pareto plot). Rebuild them with
``python -m experiments.precision_summary SWEEP_DIR [--metric val/bpb]``.
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

from experiments.sweep_summary import collect_jobs, lower_is_better, percent, write_table_files

FIELDS = ("average_bits", "size_bytes", "bit_operations")


class PrecisionSummary(Callback):
    """Hydra callback: writes the precision summary when the sweep ends."""

    def __init__(self, metric: str = "test/acc") -> None:
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            summarize(Path(config.hydra.sweep.dir), self.metric)


def _method_and_budget(job_dir: Path) -> tuple[str, float] | None:
    try:
        config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        mixed = config["callbacks"]["mixed_precision"]
        return str(mixed["method"]), float(mixed["budget"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def rows_of(sweep_dir: Path, metric: str) -> list[dict[str, Any]]:
    cells: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for job in collect_jobs(sweep_dir):
        setting = _method_and_budget(sweep_dir / job["job"])
        if setting is None or job["status"] != "ok" or job.get(metric) is None:
            continue
        cells[setting].append(job)
    rows = []
    for (method, budget), jobs in sorted(cells.items(), key=lambda item: (item[0][0] != "uniform", item[0])):
        row: dict[str, Any] = {"method": method, "budget": budget, "n": len(jobs)}
        for field in FIELDS:
            values = [float(j[f"precision/{field}"]) for j in jobs if j.get(f"precision/{field}") is not None]
            row[field] = statistics.fmean(values) if values else None
        values = [float(j[metric]) for j in jobs]
        row["mean"] = statistics.fmean(values)
        row["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def summarize(sweep_dir: Path, metric: str = "test/acc") -> list[dict[str, Any]]:
    rows = rows_of(sweep_dir, metric)
    if not rows:
        print(f"precision summary: no finished mixed-precision jobs in {sweep_dir}", file=sys.stderr)
        return rows
    write_table_files(sweep_dir, "precision", rows, markdown(rows, metric), lambda path: plot(rows, path, metric))
    print(f"precision summary: {sweep_dir / 'precision.md'}", flush=True)
    return rows


def _value(row: dict[str, Any], metric: str) -> str:
    scale = 100 if percent(metric) else 1
    return f"{scale * row['mean']:.{2 if percent(metric) else 4}f} ± {scale * row['std']:.{2 if percent(metric) else 4}f}"


def markdown(rows: list[dict[str, Any]], metric: str) -> str:
    unit = " (%)" if percent(metric) else ""
    lines = [f"# Mixed precision: {metric}{unit}, mean ± std over seeds", "",
             f"| method | budget | average bits | size (bytes) | bit-operations / sample | n | {metric} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        operations = "n/a" if row["bit_operations"] is None else f"{row['bit_operations']:.4g}"
        lines.append(f"| {row['method']} | {row['budget']:g} | {row['average_bits']:.3f} | {row['size_bytes']:.0f} | "
                     f"{operations} | {row['n']} | {_value(row, metric)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_size, by_operations) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    scale = 100 if percent(metric) else 1
    for method in dict.fromkeys(row["method"] for row in rows):
        members = [r for r in rows if r["method"] == method]
        label = "uniform bitwidths" if method == "uniform" else f"assigned ({method})"
        for axes, field in ((by_size, "size_bytes"), (by_operations, "bit_operations")):
            points = sorted((r for r in members if r[field] is not None), key=lambda r: r[field])
            axes.errorbar([r[field] for r in points], [scale * r["mean"] for r in points],
                          yerr=[scale * r["std"] for r in points], marker="o", capsize=3, label=label)
    by_size.set_xlabel("quantized weights (bytes)")
    by_operations.set_xlabel("bit-operations per sample")
    by_operations.set_xscale("log")
    better = "lower is better" if lower_is_better(metric) else "higher is better"
    by_size.set_ylabel(f"{metric}{' (%)' if percent(metric) else ''}, mean ± std ({better})")
    for axes in (by_size, by_operations):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("Per-layer bitwidths under a budget against uniform bitwidths")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild precision.md/.csv/.png of a mixed-precision sweep dir.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="test/acc", help="test/acc (default), or val/bpb for the LM, ...")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"Error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    return 0 if summarize(args.sweep_dir, args.metric) else 1


if __name__ == "__main__":
    sys.exit(main())
