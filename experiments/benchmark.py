"""How much QAT costs: training steps, the quantizer alone and peak memory, as ratios.

    python -m experiments.benchmark                 # full run (a few minutes on 2 cores)
    python -m experiments.benchmark --quick         # seconds: a smoke test of the benchmark itself
    python -m experiments.benchmark --out bench.json

Every number is a ratio taken in one process with the variants interleaved step by step
(so that a slow moment of a shared machine hits all variants alike), and the median over
the rounds. A second, identical fp32 model ("fp32 again") measures the noise floor: its
ratio would be exactly 1 on a quiet machine. Peak memory is the growth of the resident set
(VmHWM) during training, each variant in a fresh process.

Variants: fp32; torchapprox as attach() sets it up (layers recompute their quantized input
in backward); torchapprox with recompute_inputs=False (they keep it: faster, more memory);
torch.ao QAT when importable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta

BITWIDTH = 8
STATISTICS_INTERVAL = 50  # the callback's default: the trainer's log_every_n_steps


def resnet_like(num_classes: int = 10) -> nn.Sequential:
    """conv 3->32, three stages of two 3x3 conv + BN + ReLU (32, 64, 128 channels, stride 2
    entering the last two), global average pooling, linear 128->10."""

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    layers = [nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]
    for c_in, c_out, stride in ((32, 32, 1), (32, 64, 2), (64, 128, 2)):
        layers += block(c_in, c_out, stride) + block(c_out, c_out, 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


def torch_ao_available() -> bool:
    try:
        import torch.ao.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_ao_qat(model: nn.Module) -> nn.Module:
    """torch.ao QAT with a symmetric per-tensor MinMax observer on weights and activations."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import FakeQuantize, MinMaxObserver, QConfig, prepare_qat

        fake_quant = FakeQuantize.with_args(
            observer=MinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
        )
        model.qconfig = QConfig(activation=fake_quant, weight=fake_quant)
        return prepare_qat(model.train(), inplace=True)


FP32_AGAIN = "fp32 again"
KEEP_INPUTS = "torchapprox, keep inputs"  # attach(..., recompute_inputs=False)
LSQ = "torchapprox, lsq"  # learned steps on every weight and input (the "lsq" family)


def make_training_step(variant: str, batch: int, seed: int = 0) -> Callable[[], None]:
    """One SGD step of the ResNet-like CNN on a fixed 32x32 batch, as ``variant`` trains it."""
    torch.manual_seed(seed)
    model = resnet_like()
    if variant in ("torchapprox", KEEP_INPUTS):
        ta.attach(model, BITWIDTH, recompute_inputs=variant == "torchapprox")
    elif variant == LSQ:
        ta.attach(model, weight=ta.QuantSpec(bits=BITWIDTH, quantizer="lsq"),
                  input=ta.QuantSpec(bits=BITWIDTH, quantizer="lsq", options={"init": "minmax"}))
        model(torch.randn(2, 3, 32, 32))  # the input steps start from a first batch
    elif variant == "torch.ao":
        model = _torch_ao_qat(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    counter = {"step": 0}

    def step() -> None:
        # Statistics at the callback's default interval, read back as the callback does.
        logging_step = variant.startswith("torchapprox") and counter["step"] % STATISTICS_INTERVAL == 0
        if logging_step:
            ta.enable_statistics(model, True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if logging_step:
            ta.enable_statistics(model, False)
            values = [v for kinds in ta.statistics(model).values() for s in kinds.values() for v in s.values()]
            torch.stack(values).tolist()
        counter["step"] += 1

    return step


def make_lm_step(variant: str, batch: int = 32, context: int = 64, seed: int = 0,
                 attach_options: dict | None = None) -> Callable[[], None]:
    """One AdamW step of the byte-level Transformer of ``model=char_transformer`` on a fixed
    batch: fp32, or QAT with ``attach_options`` (the LM recipe's, by default)."""
    from experiments.lm import CharTransformer

    torch.manual_seed(seed)
    model = CharTransformer(context=context)
    if variant != "fp32":
        ta.attach(model, **(attach_options or LM_RECIPE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (batch, context))
    y = torch.randint(0, 256, (batch, context))
    counter = {"step": 0}

    def step() -> None:
        logging_step = variant != "fp32" and counter["step"] % STATISTICS_INTERVAL == 0
        if logging_step:
            ta.enable_statistics(model, True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if logging_step:
            ta.enable_statistics(model, False)
        counter["step"] += 1

    return step


# The same options as conf/recipe/lm_lowbit.yaml at 4 bits (the bare net: no "net." prefix).
LM_RECIPE = {"bitwidth": 4, "activation_grid": "auto", "bitwidth_overrides": {"embed": 8, "head": 8, "position": 8},
             "per_channel_weights": True, "per_token_inputs": True, "range_gradient": True}


# conf/recipe/lm_lowbit_lsq.yaml at 4 bits: learned per-channel weight steps, per-token inputs.
LM_LSQ_RECIPE = {"weight": ta.QuantSpec(bits=4, quantizer="lsq", granularity="per_channel"),
                 "input": ta.QuantSpec(bits=4, grid="auto", granularity="per_token", range_gradient=True),
                 "rules": {"embed": {"bits": 8}, "head": {"bits": 8}, "position": {"bits": 8}}}


def bench_lm(rounds: int) -> list[dict]:
    # The recipe, and what its options cost: the plain quantizer, then without the range gradient.
    variants = {"fp32": make_lm_step("fp32"), FP32_AGAIN: make_lm_step("fp32"),
                "torchapprox (LM recipe)": make_lm_step("qat"),
                "  without range gradient": make_lm_step("qat", attach_options={**LM_RECIPE, "range_gradient": False}),
                "  without range gradient, keep inputs": make_lm_step(
                    "qat", attach_options={**LM_RECIPE, "range_gradient": False, "recompute_inputs": False}),
                "torchapprox (LM recipe, learned weight steps)": make_lm_step("qat", attach_options=LM_LSQ_RECIPE),
                "torchapprox (4 bits, per tensor)": make_lm_step("qat", attach_options={"bitwidth": 4})}
    medians = interleaved_medians(variants, rounds, repeats=1)
    return [{"variant": name, "step_ms": seconds * 1e3, "ratio_to_fp32": seconds / medians["fp32"]}
            for name, seconds in medians.items()]


def interleaved_medians(functions: dict[str, Callable[[], None]], rounds: int, repeats: int) -> dict[str, float]:
    """Median seconds per call; each round runs every function ``repeats`` times, in an order
    rotated from round to round."""
    for fn in functions.values():  # warm-up: allocator, kernels, caches
        fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(repeats):
                functions[name]()
            samples[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_training(rounds_per_batch: dict[int, int]) -> list[dict]:
    """Step time per variant and batch size; each round runs one step of every variant."""
    variants = ["fp32", FP32_AGAIN, "torchapprox", KEEP_INPUTS, LSQ] + (["torch.ao"] if torch_ao_available() else [])
    rows = []
    for batch, rounds in rounds_per_batch.items():
        medians = interleaved_medians({v: make_training_step(v, batch) for v in variants}, rounds, repeats=1)
        for variant in variants:
            rows.append({"batch": batch, "variant": variant, "step_ms": medians[variant] * 1e3,
                         "ratio_to_fp32": medians[variant] / medians["fp32"]})
    return rows


def _quantizer_functions(size: int) -> dict[str, Callable[[], None]]:
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(size, generator=generator).requires_grad_()
    grad = torch.randn(size, generator=generator)
    top = 2 ** (BITWIDTH - 1) - 1
    quantizer = ta.MinMaxQuant(BITWIDTH)

    def plain_ops(t: torch.Tensor) -> torch.Tensor:
        minmax = t.detach().abs().max()
        scale = top / minmax
        x_q = torch.clamp(t, -minmax, minmax) * scale
        return (x_q + (x_q.round() - x_q).detach()) / scale  # straight-through rounding

    def aten_fused(t: torch.Tensor) -> torch.Tensor:
        scale = t.detach().abs().max() / top
        return torch.fake_quantize_per_tensor_affine(t, scale, torch.zeros((), dtype=torch.int32), -top, top)

    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "clone": torch.clone, "torchapprox": quantizer, "plain ops": plain_ops, "aten fused": aten_fused,
    }
    if torch_ao_available():
        candidates["torch.ao FakeQuantize"] = _torch_ao_qat_fake_quant()

    def run(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def once() -> None:
            fn(x).backward(grad)
            x.grad = None
        return once

    return {name: run(fn) for name, fn in candidates.items()}


def _torch_ao_qat_fake_quant() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import FakeQuantize, MinMaxObserver

        return FakeQuantize(observer=MinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8,
                            qscheme=torch.per_tensor_symmetric)


def bench_quantizer(sizes: list[int], rounds: int, repeats: int) -> list[dict]:
    rows = []
    for size in sizes:
        medians = interleaved_medians(_quantizer_functions(size), rounds, repeats)
        for name, seconds in medians.items():
            rows.append({"elements": size, "variant": name, "us": seconds * 1e6, "ratio_to_clone": seconds / medians["clone"]})
    return rows


def _resident_peak_growth(variant: str, batch: int, steps: int) -> int:
    """Bytes the resident set grew to at its peak while training (run in a fresh process)."""
    step = make_training_step(variant, batch)
    for _ in range(2):  # warm-up: one-off costs (kernel compilation, imports) are not QAT's
        step()
    # The parent sets MALLOC_MMAP_THRESHOLD_ so that every large tensor is its own mapping,
    # returned to the system when freed: the resident set then follows the live tensors.
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident set size
    before = _status_kib("VmRSS")
    for _ in range(steps):
        step()
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_memory(batch: int, steps: int) -> list[dict]:
    if not Path("/proc/self/clear_refs").exists():
        return []  # not Linux: no portable way to read a process's peak memory
    variants = ["fp32", "torchapprox", KEEP_INPUTS, LSQ] + (["torch.ao"] if torch_ao_available() else [])
    peaks = {}
    for variant in variants:
        probe = subprocess.run(
            [sys.executable, "-m", "experiments.benchmark", "--memory-probe", variant, str(batch), str(steps)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        peaks[variant] = int(probe.stdout.strip().splitlines()[-1])
    return [{"batch": batch, "variant": v, "peak_growth_mb": peaks[v] / 2**20, "ratio_to_fp32": peaks[v] / peaks["fp32"]}
            for v in variants]


def print_tables(result: dict) -> None:
    print(f"\nTraining step, ResNet-like CNN, 32x32 inputs, SGD, {BITWIDTH}-bit weights and inputs "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'batch':>6} {'variant':<25} {'ms/step':>9} {'x fp32':>8}")
    for row in result["training"]:
        print(f"{row['batch']:>6} {row['variant']:<25} {row['step_ms']:>9.2f} {row['ratio_to_fp32']:>8.3f}")
    print("\nQuantizer alone, forward + backward, against clone forward + backward")
    print(f"{'elements':>9} {'variant':<22} {'us':>10} {'x clone':>8}")
    for row in result["quantizer"]:
        print(f"{row['elements']:>9} {row['variant']:<22} {row['us']:>10.1f} {row['ratio_to_clone']:>8.2f}")
    if result["memory"]:
        print("\nPeak memory growth while training (resident set, fresh process per variant)")
        print(f"{'batch':>6} {'variant':<25} {'MB':>8} {'x fp32':>8}")
        for row in result["memory"]:
            print(f"{row['batch']:>6} {row['variant']:<25} {row['peak_growth_mb']:>8.1f} {row['ratio_to_fp32']:>8.3f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny configuration: checks the benchmark runs")
    parser.add_argument("--out", default="benchmark.json", help="where to write the results as JSON")
    parser.add_argument("--lm", action="store_true",
                        help="only the byte-level Transformer of model=char_transformer: QAT step / fp32 step")
    parser.add_argument("--memory-probe", nargs=3, metavar=("VARIANT", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        variant, batch, steps = args.memory_probe
        print(_resident_peak_growth(variant, int(batch), int(steps)))
        return {}
    if args.lm:
        torch.set_num_threads(1)  # as the LM runs of the README's sweep
        rows = bench_lm(rounds=20 if args.quick else 200)
        print(f"\nTraining step, byte-level Transformer (model=char_transformer), batch 32, 1 thread")
        for row in rows:
            print(f"{row['variant']:<28} {row['step_ms']:>9.2f} ms {row['ratio_to_fp32']:>7.3f}x")
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "lm": rows}, indent=2) + "\n")
        return {"lm": rows}

    if args.quick:
        plan = {"rounds_per_batch": {8: 3}, "rounds": 2, "repeats": 2, "sizes": [4096, 65536],
                "memory_batch": 8, "memory_steps": 2}
    else:
        # Single steps interleaved, many rounds: the median settles within about 1%.
        plan = {"rounds_per_batch": {8: 150, 64: 40}, "rounds": 30, "repeats": 20,
                "sizes": [4096, 65536, 1 << 20, 1 << 22], "memory_batch": 64, "memory_steps": 5}
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "training": bench_training(plan["rounds_per_batch"]),
        "quantizer": bench_quantizer(plan["sizes"], plan["rounds"], plan["repeats"]),
        "memory": bench_memory(plan["memory_batch"], plan["memory_steps"]),
    }
    print_tables(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    return result


if __name__ == "__main__":
    main()
