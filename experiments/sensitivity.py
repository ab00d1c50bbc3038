"""Does the Hessian sensitivity predict the measured one? Both on a finished run's model.

    python -m experiments.sensitivity RUN_DIR                  # 8 training batches, bits 2 3 4
    python -m experiments.sensitivity RUN_DIR --batches 4 --bits 2 4 8 --samples 8

Loads the run's final checkpoint (as ``experiments.export`` does), measures
``ta.sensitivity`` with the Hessian method and with the direct one on the first training
batches, prints both per layer and bitwidth and their Spearman rank correlation (over every
(layer, bits) pair, and at the lowest bits across layers), and writes them to
RUN_DIR/sensitivity.json. A bad run dir stops with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

import torchapprox as ta
from callbacks.mixed_precision import cross_entropy
from experiments.console import quiet_third_party
from experiments.export import ExportError, load_run
from experiments.sweep_summary import write_atomically
from torchapprox.sensitivity import Sensitivity


def lowest_bits_correlation(predicted: Sensitivity, measured: Sensitivity, bits: int) -> float:
    """The rank correlation across layers at one bitwidth."""
    def at(s: Sensitivity) -> Sensitivity:
        return Sensitivity({k: {bits: v[bits]} for k, v in s.values.items()}, s.params, s.macs, s.method, s.passes)

    return ta.rank_correlation(at(predicted), at(measured))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, default=8, help="training batches (default 8)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], help="bitwidths (default 2 3 4)")
    parser.add_argument("--samples", type=int, default=4, help="Hutchinson samples per batch (default 4)")
    args = parser.parse_args(argv)
    if args.batches < 1:
        print(f"Error: --batches must be an int >= 1, got {args.batches}", file=sys.stderr)
        return 2
    quiet_third_party()
    try:
        model, datamodule, _, _ = load_run(args.run_dir)
    except ExportError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    datamodule.setup("fit")
    batches = list(itertools.islice(iter(datamodule.train_dataloader()), args.batches))
    torch.manual_seed(0)
    try:
        predicted = ta.sensitivity(model, batches, cross_entropy, args.bits, method="hessian", samples=args.samples)
        measured = ta.sensitivity(model, batches, cross_entropy, args.bits, method="direct")
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    width = max(len(" + ".join(predicted.groups.get(k, [k]))) for k in predicted.values)
    print(f"{'layer':{width}s}  " + "  ".join(f"{b:>2d} bits: hessian / direct" for b in args.bits))
    for key in predicted.values:
        name = " + ".join(predicted.groups.get(key, [key]))
        print(f"{name:{width}s}  " + "  ".join(f"{predicted.values[key][b]:>12.5f} / {measured.values[key][b]:<9.5f}"
                                             for b in args.bits))
    overall = ta.rank_correlation(predicted, measured)
    lowest = lowest_bits_correlation(predicted, measured, min(args.bits))
    print(f"rank correlation (Spearman), hessian against direct: {overall:.3f} over every (layer, bits); "
          f"{lowest:.3f} across layers at {min(args.bits)} bits")
    result = {"hessian": predicted.to_dict(), "direct": measured.to_dict(), "rank_correlation": overall,
              f"rank_correlation_at_{min(args.bits)}_bits": lowest, "batches": args.batches}
    write_atomically(args.run_dir / "sensitivity.json", (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {args.run_dir / 'sensitivity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
