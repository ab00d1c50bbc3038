"""SweepSummary: a Hydra callback that tabulates and plots a sweep when it ends.

Writes into the sweep dir ``summary.csv`` (one row per job), ``summary.md`` (the jobs, then
mean ± std over seeds per cell) and ``summary.png`` (test accuracy against the final
bitwidth, a line per schedule). A failed job is listed as failed; if any failed, the sweep
exits with status 1 after the summary is written. An interrupted sweep (SIGTERM, SIGINT)
writes the summary of the jobs it has before it stops.

Rebuild the summary of a sweep dir at any time (after a crash, after jobs were added):

    python -m experiments.sweep_summary multirun/<time>
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

KNOWN_METRICS = ("val/acc", "val/bpb", "val/loss", "test/acc", "test/bpb", "test/loss")


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics the jobs report (accuracy for classifiers, bits per byte for language models)."""
    present = [m for m in KNOWN_METRICS if any(m in row for row in rows)]
    return present or ["val/acc", "val/loss", "test/acc", "test/loss"]


def columns(rows: list[dict[str, Any]]) -> list[str]:
    return ["job", "overrides", "status", *metric_columns(rows), "bitwidth", "seed", "error"]


_current_sweep_dir: Path | None = None  # the sweep this process runs, for an interrupted sweep
_current_metric = "test/acc"


class SweepSummary(Callback):
    def __init__(self, metric: str = "test/acc") -> None:
        self.metric = metric

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _current_sweep_dir, _current_metric
        _current_sweep_dir = Path(config.hydra.sweep.dir)
        _current_metric = self.metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            return  # a DDP rank's process: the main process writes the summary
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize(sweep_dir, self.metric)
        if rows is None:
            return
        failed = [row["job"] for row in rows if row["status"] != "ok"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs failed (jobs {', '.join(failed)}): see {sweep_dir / 'summary.md'}",
                  file=sys.stderr)
            sys.exit(1)


def summarize(sweep_dir: Path, metric: str = "test/acc") -> list[dict[str, Any]] | None:
    """Write the summary files of ``sweep_dir`` from its job dirs; the rows, or None if none."""
    rows = collect_jobs(sweep_dir)
    if not rows:
        log.warning("no jobs found in %s: nothing to summarise", sweep_dir)
        return None
    write_summary(rows, sweep_dir, metric)
    print(f"sweep summary: {sweep_dir / 'summary.md'}", flush=True)
    return rows


def summarize_current_sweep() -> None:
    """After an interruption: the summary of the sweep this process was running, if any."""
    if _current_sweep_dir is not None and _current_sweep_dir.is_dir():
        summarize(_current_sweep_dir, _current_metric)


def _job_number(job_dir: Path) -> float:
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    try:
        return float(yaml.safe_load(hydra_yaml.read_text())["hydra"]["job"]["num"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return float(job_dir.name) if job_dir.name.isdigit() else float("inf")


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory (one holding .hydra/overrides.yaml), in job order."""
    if not sweep_dir.is_dir():
        return []
    job_dirs = [d for d in sweep_dir.iterdir() if (d / ".hydra" / "overrides.yaml").is_file()]
    rows = []
    for job_dir in sorted(job_dirs, key=lambda d: (_job_number(d), d.name)):
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
        row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides), "status": "failed", "error": ""}
        row["parsed"] = dict(o.lstrip("+~").split("=", 1) if "=" in o else (o.lstrip("+~"), "") for o in overrides)
        metrics_file = job_dir / "metrics.json"
        failure_file, interrupted_file = job_dir / "failed.json", job_dir / "interrupted.json"
        try:
            if metrics_file.is_file():
                row.update(_json_object(metrics_file))
            elif interrupted_file.is_file():
                marker = _json_object(interrupted_file)
                row.update(status="interrupted",
                           error=f"interrupted by {marker.get('signal')} in epoch {marker.get('epoch')}")
            elif failure_file.is_file():
                row.update(_json_object(failure_file))
            else:
                row["error"] = "no metrics.json: the job did not finish"
        except ValueError as error:  # a file cut short or edited by hand: the job is listed, not counted
            row.update(status="failed", error=str(error))
        rows.append(row)
    return rows


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path.name} is not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} holds {type(value).__name__}, not an object")
    return value


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
        measured = [m for m in members if m.get(metric) is not None]
        values = [float(m[metric]) for m in measured]
        result.append({
            "cell": key,
            "series": _key(members[0], series_keys),
            "bitwidth": members[0].get("bitwidth"),
            "n": len(values),
            "values": values,
            # seed -> value: an fp32 job ignores `bits`, so a sweep over bits repeats it per seed
            "by_seed": {m["parsed"].get("seed", m.get("seed", m["job"])): float(m[metric]) for m in measured},
            "mean": statistics.fmean(values) if values else float("nan"),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        })
    return sorted(result, key=lambda c: (c["series"], c["bitwidth"] or 99))


def write_summary(rows: list[dict[str, Any]], sweep_dir: Path, metric: str = "test/acc") -> None:
    """summary.csv, summary.md and summary.png, each replaced atomically."""
    cells = aggregate(rows, metric)
    write_table_files(sweep_dir, "summary", rows, _markdown(rows, cells, metric),
                      lambda path: _plot(cells, path, metric), fieldnames=columns(rows))


def write_table_files(sweep_dir: Path, stem: str, rows: list[dict[str, Any]], markdown: str,
                      plot: Callable[[Path], None], fieldnames: list[str] | None = None) -> None:
    """``<stem>.csv`` (the rows), ``<stem>.md`` and ``<stem>.png`` (``plot(path)`` draws it),
    each written beside its target and renamed over it: a crash leaves the old file whole."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fieldnames or list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(sweep_dir / f"{stem}.csv", table.getvalue().encode())
    write_atomically(sweep_dir / f"{stem}.md", markdown.encode())
    temporary = sweep_dir / f".{stem}.{os.getpid()}.png"
    try:
        plot(temporary)
        temporary.replace(sweep_dir / f"{stem}.png")
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def percent(metric: str) -> bool:
    """Accuracies are shown in percent; other metrics (losses, bits per byte) as they are."""
    return metric.rsplit("/", 1)[-1].endswith("acc")


def lower_is_better(metric: str) -> bool:
    return not percent(metric)


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
            # fp32 cells of one series (one per swept bitwidth: the same runs again) pool into
            # one entry, a value per seed
            values = list(_per_seed(members).values()) if bits is None else [v for m in members for v in m["values"]]
            if not values:
                entries.append("")
                continue
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            unit = 100 if percent(metric) else 1
            entries.append(f"{unit * statistics.fmean(values):.{2 if percent(metric) else 3}f} ± {unit * std:.{2 if percent(metric) else 3}f}")
        lines.append(f"| {name} | " + " | ".join(entries) + " |")
    return lines + [""]


def _per_seed(cells: list[dict[str, Any]]) -> dict[Any, float]:
    """The cells' values, one per seed (cells that repeat a run give it once)."""
    merged: dict[Any, float] = {}
    for cell in cells:
        merged.update(cell["by_seed"])
    return merged


def _markdown(rows: list[dict[str, Any]], cells: list[dict[str, Any]], metric: str) -> str:
    lines = ["# Sweep summary", "", "## Jobs", "",
             "| job | overrides | status | " + " | ".join(metric_columns(rows)) + " | bitwidth | error |",
             "|---|---|---|" + "---:|" * len(metric_columns(rows)) + "---:|---|"]
    for row in rows:
        values = " | ".join(_format(row.get(m)) for m in metric_columns(rows))
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
        baseline = list(_per_seed([c for c in members if c["bitwidth"] is None]).values())
        if baseline:  # one line for the series, however many swept bitwidths it ran under
            axes.axhline(statistics.fmean(baseline), linestyle="--", color="gray", label=f"{name} (fp32)")
    axes.set_xlabel("final bitwidth")
    better = "lower is better" if lower_is_better(metric) else "higher is better"
    axes.set_ylabel(f"{metric} (mean ± std over seeds; {better})")
    axes.set_title(f"{metric} against bitwidth")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def sweep_metric(sweep_dir: Path) -> str:
    """The metric the sweep was summarised by (its multirun.yaml), else test/acc."""
    try:
        config = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
        return str(config["hydra"]["callbacks"]["sweep_summary"]["metric"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "test/acc"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild summary.csv, summary.md and summary.png of a sweep dir.")
    parser.add_argument("sweep_dir", type=Path, help="a sweep dir (multirun/<time>), holding one dir per job")
    parser.add_argument("--metric", default=None,
                        help="the metric of the tables and the plot (default: the sweep's own, "
                             "hydra.callbacks.sweep_summary.metric, else test/acc)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"Error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    rows = collect_jobs(args.sweep_dir)
    if not rows:
        print(f"Error: {args.sweep_dir} holds no job dirs (none has .hydra/overrides.yaml)", file=sys.stderr)
        return 2
    metric = args.metric or sweep_metric(args.sweep_dir)
    reported = [m for m in metric_columns(rows) if any(row.get(m) is not None for row in rows)]
    if any(row["status"] == "ok" for row in rows) and metric not in reported:
        print(f"Error: --metric {metric!r} is not reported by the jobs of {args.sweep_dir} "
              f"(they report: {', '.join(reported) or 'nothing'})", file=sys.stderr)
        return 2
    summarize(args.sweep_dir, metric)
    print(f"{len(rows)} jobs: {sum(r['status'] == 'ok' for r in rows)} finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
