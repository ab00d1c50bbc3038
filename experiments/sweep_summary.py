"""SweepSummary: a Hydra callback that tabulates and plots a sweep when it ends.

Writes into the sweep dir ``summary.csv`` (one row per job), ``summary.md`` (the jobs, then
mean ± std over seeds per cell) and ``summary.png`` (test accuracy against the final
bitwidth, a line per schedule). A failed job is listed as failed; if any failed, the sweep
exits with status 1 after the summary is written.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRICS = ("val/acc", "val/loss", "test/acc", "test/loss")
COLUMNS = ("job", "overrides", "status", *METRICS, "bitwidth", "seed", "error")


class SweepSummary(Callback):
    def __init__(self, metric: str = "test/acc") -> None:
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_jobs(sweep_dir)
        if not rows:
            log.warning("no jobs found in %s: nothing to summarise", sweep_dir)
            return
        write_summary(rows, sweep_dir, self.metric)
        log.info("sweep summary: %s", sweep_dir / "summary.md")
        failed = [row["job"] for row in rows if row["status"] != "ok"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs failed (jobs {', '.join(failed)}): see {sweep_dir / 'summary.md'}",
                  file=sys.stderr)
            sys.exit(1)


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (one holding .hydra/overrides.yaml), in job order."""
    job_dirs = [d for d in sweep_dir.iterdir() if (d / ".hydra" / "overrides.yaml").is_file()]
    rows = []
    for job_dir in sorted(job_dirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else d.name)):
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
        row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides), "status": "failed", "error": ""}
        row["parsed"] = dict(o.lstrip("+~").split("=", 1) if "=" in o else (o.lstrip("+~"), "") for o in overrides)
        metrics_file, failure_file = job_dir / "metrics.json", job_dir / "failed.json"
        if metrics_file.is_file():
            row.update(json.loads(metrics_file.read_text()))
        elif failure_file.is_file():
            row.update(json.loads(failure_file.read_text()))
        else:
            row["error"] = "no metrics.json: the job did not finish"
        rows.append(row)
    return rows


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs (the others are common to all)."""
    keys = dict.fromkeys(k for row in rows for k in row["parsed"])
    return [k for k in keys if len({row["parsed"].get(k) for row in rows}) > 1]


def _key(row: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={row['parsed'].get(k, '')}" for k in keys) or "all jobs"


def aggregate(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean and std of ``metric`` per cell: jobs that differ only in their seed.

    A line of the plot (its series) joins the cells that differ only in the bitwidth.
    """
    swept = [k for k in swept_keys(rows) if k != "seed"]
    series_keys = [k for k in swept if "bits" not in k.split(".")[-1]]
    cells: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            cells[_key(row, swept)].append(row)
    result = []
    for key, members in cells.items():
        values = [float(m[metric]) for m in members if m.get(metric) is not None]
        result.append({
            "cell": key,
            "series": _key(members[0], series_keys),
            "bitwidth": members[0].get("bitwidth"),
            "n": len(values),
            "values": values,
            "mean": statistics.fmean(values) if values else float("nan"),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        })
    return sorted(result, key=lambda c: (c["series"], c["bitwidth"] or 99))


def write_summary(rows: list[dict[str, Any]], sweep_dir: Path, metric: str = "test/acc") -> None:
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    cells = aggregate(rows, metric)
    (sweep_dir / "summary.md").write_text(_markdown(rows, cells, metric))
    _plot(cells, sweep_dir / "summary.png", metric)


def _format(value: Any) -> str:
    if value is None or value == "":
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _pivot(cells: list[dict[str, Any]], metric: str) -> list[str]:
    """One row per series, one column per final bitwidth: mean ± std (the results table)."""
    columns = sorted({c["bitwidth"] for c in cells if c["bitwidth"] is not None}) + (
        [None] if any(c["bitwidth"] is None for c in cells) else [])
    series: dict[str, dict[Any, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        series[cell["series"]][cell["bitwidth"]].append(cell)
    names = ["fp32" if b is None else f"{b} bits" for b in columns]
    lines = [f"## {metric}: mean ± std over seeds, by final bitwidth", "",
             "| series | " + " | ".join(names) + " |", "|---|" + "---:|" * len(columns)]
    for name, by_bits in series.items():
        entries = []
        for bits in columns:
            members = by_bits.get(bits, [])
            if not members:
                entries.append("")
                continue
            # fp32 cells of one series (one per swept bitwidth) pool into one entry
            values = [v for m in members for v in m["values"]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            entries.append(f"{100 * statistics.fmean(values):.2f} ± {100 * std:.2f}")
        lines.append(f"| {name} | " + " | ".join(entries) + " |")
    return lines + [""]


def _markdown(rows: list[dict[str, Any]], cells: list[dict[str, Any]], metric: str) -> str:
    lines = ["# Sweep summary", "", "## Jobs", "",
             "| job | overrides | status | " + " | ".join(METRICS) + " | bitwidth | error |",
             "|---|---|---|" + "---:|" * len(METRICS) + "---:|---|"]
    for row in rows:
        values = " | ".join(_format(row.get(m)) for m in METRICS)
        bitwidth = _format(row.get("bitwidth")) if row["status"] == "ok" else ""
        lines.append(f"| {row['job']} | {row['overrides']} | {row['status']} | {values} | {bitwidth} | {row.get('error', '')} |")
    lines += [""] + _pivot(cells, metric) + [f"## {metric}: mean ± std over seeds, per cell", "",
              "| cell | final bitwidth | n | mean | std |", "|---|---:|---:|---:|---:|"]
    for cell in cells:
        bits = cell["bitwidth"] if cell["bitwidth"] is not None else "fp32"
        lines.append(f"| {cell['cell']} | {bits} | {cell['n']} | {cell['mean']:.4f} | {cell['std']:.4f} |")
    return "\n".join(lines) + "\n"


def _plot(cells: list[dict[str, Any]], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        series[cell["series"]].append(cell)
    for name, members in sorted(series.items()):
        quantized = sorted((c for c in members if c["bitwidth"] is not None), key=lambda c: c["bitwidth"])
        if quantized:
            axes.errorbar([c["bitwidth"] for c in quantized], [c["mean"] for c in quantized],
                          yerr=[c["std"] for c in quantized], marker="o", capsize=3, label=name)
        baseline = [v for c in members if c["bitwidth"] is None for v in c["values"]]
        if baseline:  # one line for the series, however many swept bitwidths it ran under
            axes.axhline(statistics.fmean(baseline), linestyle="--", color="gray", label=f"{name} (fp32)")
    axes.set_xlabel("final bitwidth")
    axes.set_ylabel(f"{metric} (mean ± std over seeds)")
    axes.set_title("Accuracy against bitwidth")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
