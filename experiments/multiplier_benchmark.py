"""How fast approximate multiplication runs on the CPU, as ratios to the fp32 GEMM.

    python -m experiments.multiplier_benchmark             # layer-sized problems (about a minute on 2 cores)
    python -m experiments.multiplier_benchmark --quick     # seconds: a smoke test of the benchmark itself
    python -m experiments.multiplier_benchmark --out mult.json
    python -m experiments.multiplier_benchmark --training  # training steps of both CNNs (a few minutes)

Problems (``out[m, n] = sum_k T[x[m, k], w[n, k]]``):

- conv: the GEMM of a 3x3 convolution 32 -> 64 channels on a 64 x 16 x 16 batch (im2col form:
  x [16384, 288], w [64, 288]), and the convolution itself (x [64, 32, 16, 16]);
- linear: x [64, 512], w [256, 512].

Variants, in one process, interleaved round by round (a slow moment of a shared machine hits
all alike), median over the rounds:

- ``fp32 GEMM``: torch.mm of random floats (the baseline of every ratio);
- ``exact fake-quant``: torch.mm of level tensors, what an exact fake-quantized layer runs;
- ``decomposition <m>``: ``approx_linear_levels(path="decomposition")`` end to end (level
  checks, operand transforms, chunked exact GEMM);
- ``table op <m>``: the C++ kernel ``torchapprox::approx_matmul`` on prepared uint8 indices;
- ``table path <m>``: ``approx_linear_levels(path="table")`` end to end (indices included);
- ``naive loop``: ``torchapprox::approx_matmul_naive``, the straightforward
  ``acc += T[x][w]`` loop of the original library (same threads, same library);
- ``plain-torch reference``: the lookups every other device runs (few rounds: slow).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import torchapprox.multipliers as tm
from torchapprox.multipliers import cpu_extension, reference

OPS = torch.ops.torchapprox


def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _levels(shape, generator, low=-128, high=127) -> torch.Tensor:
    return torch.randint(low, high + 1, shape, generator=generator).float()


def _matmul_variants(m_rows: int, k: int, n: int, generator: torch.Generator) -> dict[str, Callable[[], object]]:
    x, w = _levels((m_rows, k), generator), _levels((n, k), generator)
    xf, wf = torch.randn(m_rows, k, generator=generator), torch.randn(n, k, generator=generator)
    x_idx, w_idx = (x + 128).to(torch.uint8), (w + 128).to(torch.uint8)
    exact, drum, mitchell = tm.exact(), tm.drum(4), tm.mitchell()
    shallow, truncated, deep = tm.truncated(1), tm.truncated(3), tm.truncated(7)
    wide_table = tm.exact().table * 4  # spans 17 bits: three byte planes
    return {
        "fp32 GEMM": lambda: torch.mm(xf, wf.t()),
        "exact fake-quant (mm of levels)": lambda: torch.mm(x, w.t()),
        "decomposition exact": lambda: tm.approx_linear_levels(x, w, exact, path="decomposition"),
        "decomposition drum(4), rank 1": lambda: tm.approx_linear_levels(x, w, drum, path="decomposition"),
        "decomposition truncated(1), rank 2": lambda: tm.approx_linear_levels(x, w, shallow, path="decomposition"),
        "decomposition truncated(3), rank 4": lambda: tm.approx_linear_levels(x, w, truncated, path="decomposition"),
        "decomposition truncated(7), rank 8": lambda: tm.approx_linear_levels(x, w, deep, path="decomposition"),
        "table path truncated(7)": lambda: tm.approx_linear_levels(x, w, deep, path="table"),
        "table path mitchell": lambda: tm.approx_linear_levels(x, w, mitchell, path="table"),
        "table op mitchell (C++)": lambda: OPS.approx_matmul(x_idx, w_idx, mitchell.table),
        "table op 3-byte-plane table (C++)": lambda: OPS.approx_matmul(x_idx, w_idx, wide_table),
        "naive loop (C++)": lambda: OPS.approx_matmul_naive(x_idx, w_idx, mitchell.table),
    }


def _conv_variants(batch: int, generator: torch.Generator) -> dict[str, Callable[[], object]]:
    x, w = _levels((batch, 32, 16, 16), generator), _levels((64, 32, 3, 3), generator)
    xf, wf = torch.randn(batch, 32, 16, 16, generator=generator), torch.randn(64, 32, 3, 3, generator=generator)
    exact, drum, mitchell = tm.exact(), tm.drum(4), tm.mitchell()
    return {
        "fp32 conv2d": lambda: F.conv2d(xf, wf, padding=1),
        "decomposition exact conv": lambda: tm.approx_conv_levels(x, w, exact, padding=1, path="decomposition"),
        "decomposition drum(4) conv": lambda: tm.approx_conv_levels(x, w, drum, padding=1, path="decomposition"),
        "table path mitchell conv": lambda: tm.approx_conv_levels(x, w, mitchell, padding=1, path="table"),
    }


def _run(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for function in variants.values():  # warm-up: first calls build caches and wake threads
        function()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, function in variants.items():
            times[name].append(_timed(function))
    return {name: statistics.median(values) for name, values in times.items()}


def _report(title: str, medians: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    base = medians[baseline]
    for name, seconds in medians.items():
        print(f"  {name:<42} {seconds * 1e3:9.2f} ms   x{seconds / base:6.2f} of {baseline}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small problems, few rounds (seconds)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 15; 3 quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 gives steadier numbers on a shared machine)")
    parser.add_argument("--out", help="write the medians and ratios as JSON here")
    parser.add_argument("--training", action="store_true",
                        help="instead: SGD steps of the benchmark CNN (32x32) and the digits CNN (8x8), batch 64, "
                             "8 bits, with each multiplier")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    if args.training:
        return {model: bench_training_steps(model, 2 if args.quick else 64, rounds, args.out)
                for model in ("benchmark CNN", "digits CNN")}
    if not cpu_extension.kernels_loaded():
        print("warning: the C++ kernels are not loaded; the table op runs the plain-torch reference")
    generator = torch.Generator().manual_seed(0)
    batch = 2 if args.quick else 64
    problems = {
        f"conv GEMM: x [{batch * 256}, 288] x w [64, 288]": (batch * 256, 288, 64),
        "linear: x [64, 512] x w [256, 512]": (64, 512, 256),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds, medians")
    results: dict[str, dict] = {}
    for title, (m_rows, k, n) in problems.items():
        variants = _matmul_variants(m_rows, k, n, generator)
        medians = _run(variants, rounds)
        x_idx = torch.randint(0, 256, (m_rows, k), generator=generator).to(torch.uint8)
        w_idx = torch.randint(0, 256, (n, k), generator=generator).to(torch.uint8)
        table = tm.mitchell().table
        medians["plain-torch reference"] = _run({"r": lambda: reference.approx_matmul(x_idx, w_idx, table)},
                                                1 if not args.quick else 2)["r"]
        _report(title, medians, "fp32 GEMM")
        speedup = medians["naive loop (C++)"] / medians["table op mitchell (C++)"]
        print(f"  table op vs naive loop: {speedup:.1f}x faster")
        ratios = {name: seconds / medians["fp32 GEMM"] for name, seconds in medians.items()}
        results[title] = {"median_s": medians, "ratio_to_fp32": ratios, "table_op_speedup_over_naive": speedup}
    conv = _run(_conv_variants(batch, generator), rounds)
    title = f"conv2d 32 -> 64, 3x3, padding 1, x [{batch}, 32, 16, 16]"
    _report(title, conv, "fp32 conv2d")
    results[title] = {"median_s": conv, "ratio_to_fp32": {k: v / conv["fp32 conv2d"] for k, v in conv.items()}}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


TRAINING_MULTIPLIERS = {"drum(4)": lambda: tm.drum(4), "truncated(4)": lambda: tm.truncated(4),
                        "broken_array(2, 6)": lambda: tm.broken_array(2, 6), "mitchell (table)": tm.mitchell}


def bench_training_steps(name: str, batch: int, rounds: int, out: str | None) -> dict:
    """SGD steps of ``experiments.benchmark``'s CNN (32x32 inputs) or the digits CNN of
    ``model=cnn`` (8x8), 8-bit weights and inputs, auto input grid, with exact fake
    quantization and with each multiplier, as ratios to the fp32 step and to the exact
    fake-quantized step; interleaved, medians."""
    import torchapprox as ta
    from experiments.benchmark import interleaved_medians, resnet_like
    from experiments.models import ConvNet

    def step_of(multiplier: Callable[[], tm.Multiplier] | None, quantized: bool = True) -> Callable[[], None]:
        torch.manual_seed(0)
        if name == "digits CNN":
            model, shape = ConvNet(in_channels=1, num_classes=10, channels=[32, 64, 128]), (batch, 1, 8, 8)
        else:
            model, shape = resnet_like(), (batch, 3, 32, 32)
        if quantized:
            ta.attach(model, 8, activation_grid="auto", multiplier=None if multiplier is None else multiplier())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(*shape), torch.randint(0, 10, (batch,))

        def step() -> None:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    steps = {"fp32": step_of(None, quantized=False), "exact fake-quant": step_of(None)}
    steps.update({name: step_of(make) for name, make in TRAINING_MULTIPLIERS.items()})
    medians = interleaved_medians(steps, rounds, repeats=1)
    print(f"Training step, {name}, batch {batch}, 8 bits, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {rounds} rounds (medians)")
    print(f"{'variant':28s} {'ms/step':>9s} {'x fp32':>8s} {'x fake-quant':>13s}")
    for name, seconds in medians.items():
        print(f"{name:28s} {seconds * 1e3:9.2f} {seconds / medians['fp32']:8.2f} "
              f"{seconds / medians['exact fake-quant']:13.2f}")
    results = {"batch": batch, "median_s": medians}
    if out:
        path = f"{out.removesuffix('.json')}.{name.split()[0]}.json"  # one file per model
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
