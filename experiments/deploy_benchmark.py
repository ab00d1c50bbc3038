"""Deployment benchmark: does the exported QAT model pay off in ONNX Runtime?

    python -m experiments.deploy_benchmark                 # a few minutes on 2 cores
    python -m experiments.deploy_benchmark --quick         # seconds: a smoke test of the benchmark itself
    python -m experiments.deploy_benchmark --out deploy.json

Two models: the benchmark CNN of ``experiments.benchmark`` (7 conv + BatchNorm + ReLU,
global pooling, a linear head; 32x32 inputs) and one block of the language model
(``experiments.lm.Block``: LayerNorm, causal multi-head attention, GELU MLP; 64 tokens of 64
features). Each runs in ONNX Runtime (CPU provider, one intra-op thread) as

- ``float``: the float model;
- ``ours 8-bit`` / ``ours 4-bit``: attached as ``+quant=deploy`` sets up (per-channel
  weights, BatchNorm folded, pooling inputs quantized, static input scales calibrated on
  the same batches), exported by ``torchapprox.export_onnx``; at 4 bits twice: int8
  containers (ONNX Runtime's integer kernels) and packed INT4 (half the file, float kernels);
- ``ours, per-token`` (the block): the LM recipe's one scale per token (float ops in the graph);
- ``ORT quantize_static``: ONNX Runtime's own post-training quantization of the float model
  (QDQ, uint8 activations, int8 per-channel weights, the same calibration batches).

Latency: the median over interleaved rounds (every model once per round, in rotating
order) at batch 1 and 64, all in one process; file sizes; and how far each model's outputs
are from the attached PyTorch model's (ours) or the float model's (ORT's). Weights are
random (a trained model times the same); the accuracy of trained runs is the README's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import torchapprox as ta
from experiments.benchmark import resnet_like
from experiments.console import quiet_third_party
from experiments.export import export_float, latency, ort_quantize_static


class TransformerBlock(nn.Module):
    """The language model's block on ``(batch, tokens, features)`` with its causal mask."""

    def __init__(self, dim: int = 64, heads: int = 4, tokens: int = 64) -> None:
        super().__init__()
        from experiments.lm import Block

        self.block = Block(dim, heads, 4, 0.0)
        self.register_buffer("mask", torch.triu(torch.full((tokens, tokens), float("-inf")), 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.mask)


def _deploy_copy(model: nn.Module, bits: int, calibration: list[torch.Tensor], per_token: bool = False) -> nn.Module:
    quantized = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "found no ... BatchNorm" for the block
        ta.attach(quantized, bits, weight={"granularity": "per_channel", "fold_batchnorm": True},
                  input={"grid": "auto", "granularity": "per_token" if per_token else "per_tensor"},
                  quantize_pooling=True)
    quantized.train()
    with torch.no_grad():  # BatchNorm statistics of the calibration data (random weights)
        for x in calibration:
            quantized(x)
    quantized.eval()
    if not per_token:
        ta.calibrate(quantized, calibration)
    return quantized


def _float_copy(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    trained = copy.deepcopy(model).train()
    with torch.no_grad():
        for x in calibration:
            trained(x)
    return trained.eval()


def measure(name: str, model: nn.Module, shape: tuple[int, ...], bits: list[int], rounds: int, scratch: Path,
            per_token: bool = False) -> dict:
    torch.manual_seed(0)
    calibration = [torch.randn(16, *shape) for _ in range(4)]
    example = torch.randn(64, *shape)
    reference = _float_copy(model, calibration)
    paths, outputs = {}, {}
    float_attached = copy.deepcopy(reference)
    ta.attach(float_attached, 8)  # export_float detaches a copy: it takes an attached model
    paths["float"] = export_float(float_attached, example, scratch / f"{name}_float.onnx")
    with torch.no_grad():
        outputs["float"] = reference(example).numpy()
    for b in bits:
        quantized = _deploy_copy(reference, b, calibration)
        with torch.no_grad():
            outputs[f"ours {b}-bit"] = quantized(example).numpy()
        paths[f"ours {b}-bit"] = ta.export_onnx(quantized, example, scratch / f"{name}_{b}.onnx", pack_weights=False)
        if b <= 4:
            outputs[f"ours {b}-bit, packed"] = outputs[f"ours {b}-bit"]
            paths[f"ours {b}-bit, packed"] = ta.export_onnx(quantized, example, scratch / f"{name}_{b}p.onnx")
    if per_token:
        quantized = _deploy_copy(reference, bits[0], calibration, per_token=True)
        with torch.no_grad():
            outputs["ours, per-token"] = quantized(example).numpy()
        paths["ours, per-token"] = ta.export_onnx(quantized, example, scratch / f"{name}_token.onnx")
    paths["ORT quantize_static"] = ort_quantize_static(paths["float"], [(x,) for x in calibration], scratch)
    outputs["ORT quantize_static"] = outputs["float"]
    times = {batch: latency(paths, example[:batch].numpy(), rounds=rounds) for batch in (1, 64)}
    rows = {}
    for variant, path in paths.items():
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
        scale = float(np.abs(outputs[variant]).max())
        rows[variant] = {
            "file_kib": path.stat().st_size / 1024,
            "size_vs_float": path.stat().st_size / paths["float"].stat().st_size,
            "batch1_ms": times[1][variant], "batch1_vs_float": times[1][variant] / times[1]["float"],
            "batch64_ms": times[64][variant], "batch64_vs_float": times[64][variant] / times[64]["float"],
            "max_error_vs_reference": float(np.abs(got - outputs[variant]).max()) / scale,
        }
    return rows


def table(name: str, rows: dict) -> str:
    lines = [f"### {name}", "",
             "| model | file KiB (x float) | batch 1 ms (x float) | batch 64 ms (x float) | max error / max output |",
             "|---|---|---|---|---|"]
    for variant, r in rows.items():
        lines.append(f"| {variant} | {r['file_kib']:.1f} ({r['size_vs_float']:.2f}x) | {r['batch1_ms']:.3f} "
                     f"({r['batch1_vs_float']:.2f}x) | {r['batch64_ms']:.2f} ({r['batch64_vs_float']:.2f}x) | "
                     f"{r['max_error_vs_reference']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds, 8 bits only: a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    quiet_third_party()
    torch.set_num_threads(1)
    rounds = 10 if args.quick else 200
    bits = [8] if args.quick else [8, 4]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        results["benchmark CNN (32x32 inputs)"] = measure("cnn", resnet_like(), (3, 32, 32), bits, rounds,
                                                         Path(scratch))
        results["Transformer block (64 tokens x 64 features)"] = measure(
            "block", TransformerBlock(), (64, 64), bits, rounds, Path(scratch), per_token=True)
    import onnxruntime

    print(f"ONNX Runtime {onnxruntime.__version__}, CPU provider, 1 intra-op thread; torch {torch.__version__}")
    for name, rows in results.items():
        print()
        print(table(name, rows))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
