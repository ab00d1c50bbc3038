"""Export every run of a deployment sweep and compare ONNX Runtime with PyTorch.

    python -m experiments.deploy_results multirun/<date>/<time>

For each finished job of ``+experiment=deploy_results`` (or any sweep of classifier runs
with constant input scales) the final checkpoint is exported with
``torchapprox.export_onnx`` (int8 weight containers: ONNX Runtime's integer kernels) and run
in ONNX Runtime on the test split. Writes ``deploy_results.csv`` (one row per job),
``deploy_results.md`` (per setting: PyTorch's test accuracy, mean ± std over seeds, and
whether ONNX Runtime's equals it in every run) and ``deploy_results.png`` into the sweep
dir. A bad sweep dir stops with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from experiments.console import quiet_third_party
from experiments.export import ExportError, load_run, onnx_accuracy, torch_accuracy
from experiments.sweep_summary import collect_jobs, write_table_files

SETTINGS = ("callbacks.qat.weight.fold_batchnorm", "callbacks.qat.input.grid", "bits")


def evaluate(job_dir: Path, scratch: Path) -> dict:
    import torchapprox as ta

    model, datamodule, state, _ = load_run(job_dir)
    loader = datamodule.test_dataloader()
    example = next(iter(loader))[0]
    path = ta.export_onnx(model, example, scratch / f"{job_dir.name}.onnx", pack_weights=False)
    return {"pytorch_acc": torch_accuracy(model, loader), "onnx_acc": onnx_accuracy(path, loader)[0],
            "bits": state["bitwidth"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    quiet_third_party()
    jobs = [job for job in collect_jobs(args.sweep_dir) if job["status"] == "ok"]
    if not jobs:
        print(f"Error: {args.sweep_dir} holds no finished job of a sweep (.hydra/overrides.yaml and metrics.json)",
              file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, job in enumerate(jobs, 1):
            job_dir = args.sweep_dir / job["job"]
            try:
                measured = evaluate(job_dir, Path(scratch))
            except ExportError as error:
                print(f"job {job['job']}: {error}", file=sys.stderr)
                continue
            row = {"job": job["job"], **{key: job["parsed"].get(key, "") for key in SETTINGS},
                   "seed": job["parsed"].get("seed", ""), **measured}
            rows.append(row)
            print(f"[{index}/{len(jobs)}] job {job['job']} {job['overrides']}: PyTorch {row['pytorch_acc']:.4f}, "
                  f"ONNX Runtime {row['onnx_acc']:.4f}", flush=True)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in SETTINGS), []).append(row)
    lines = ["## Deployment: PyTorch's test accuracy (mean ± std over seeds) and ONNX Runtime's", "",
             "| fold_batchnorm | input grid | bits | runs | PyTorch test acc | ONNX Runtime = PyTorch | max abs difference |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (str(k[0]), str(k[1]), int(k[2] or 0))):
        group = groups[key]
        accuracies = [100 * r["pytorch_acc"] for r in group]
        spread = f" ± {statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
        equal = sum(r["onnx_acc"] == r["pytorch_acc"] for r in group)
        difference = max(abs(r["onnx_acc"] - r["pytorch_acc"]) for r in group)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {len(group)} | {statistics.mean(accuracies):.2f}{spread} | "
                     f"{equal}/{len(group)} | {100 * difference:.2f} points |")
    markdown = "\n".join(lines) + "\n"

    def plot(path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for (fold, grid), marker in zip(sorted({k[:2] for k in groups}), "osd^"):
            keys = sorted((k for k in groups if k[:2] == (fold, grid)), key=lambda k: int(k[2]))
            axis.errorbar([int(k[2]) for k in keys],
                          [statistics.mean(100 * r["pytorch_acc"] for r in groups[k]) for k in keys],
                          yerr=[statistics.stdev([100 * r["pytorch_acc"] for r in groups[k]])
                                if len(groups[k]) > 1 else 0 for k in keys],
                          marker=marker, capsize=3, label=f"fold={fold}, grid={grid}")
        axis.set_xlabel("bits")
        axis.set_ylabel("test accuracy (%)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(path, format="png")
        plt.close(figure)

    write_table_files(args.sweep_dir, "deploy_results", rows, markdown, plot)
    print(markdown)
    print(f"wrote {args.sweep_dir / 'deploy_results.md'} (.csv, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
