"""Export a finished run to ONNX in QDQ form and check it in ONNX Runtime.

    python -m experiments.export outputs/<run>                # dynamic input scales
    python -m experiments.export outputs/<run> --static       # constant (calibrated) input scales
    python -m experiments.export outputs/<run> --static --latency   # float, ours and ORT's quantize_static side by side
    python -m experiments.export outputs/<run> --int8-weights # 4-bit weights in int8 (integer kernels), not packed
    python -m experiments.export outputs/<run> --latency --threads 2   # ONNX Runtime's intra-op threads (default 1)

Loads the run's final checkpoint (checkpoints/last.ckpt, the end of its last epoch) with
the bitwidth it trained at, writes RUN_DIR/model.onnx, runs it in ONNX Runtime on the run's
test split and prints its test metric (accuracy; bits per byte for the language model)
beside PyTorch's and metrics.json's, the weights' integer types, and the file sizes of the
float and the QDQ model; ``--latency`` adds a table of file size, test metric and latency at
batch 1 and 64 of the float model, ours, (4 bits and fewer, packed) ours with int8 weights,
and with ``--static`` ONNX Runtime's own ``quantize_static`` of the float model. With
``--static`` the input ranges come from the checkpoint
when the run calibrated them (``callbacks.qat.calibrate_batches``), else from the run's
training split, calibrated here. A bad run dir, or a checkpoint without quantization state,
stops with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import torchapprox as ta
from experiments.console import quiet_third_party
from experiments.module import Classifier
from experiments.sweep_summary import write_atomically
from callbacks.checkpoint import quantization_from_checkpoint, restore_quantized
from torchapprox.calibration import calibrate, input_quantizers, takes_static_range
from torchapprox.export import export_onnx
from torchapprox.export.onnx import strip_debug_info, weight_storage


class ExportError(Exception):
    """A run dir or checkpoint this command cannot export (one line, exit 2)."""


def load_run(run_dir: Path):
    """(model attached at the final bitwidth and ranges, data module, config, checkpoint path)."""
    import experiments.train  # noqa: F401 - registers the resolvers the saved config uses

    config_path, checkpoint_path = run_dir / ".hydra" / "config.yaml", run_dir / "checkpoints" / "last.ckpt"
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory")
    if not config_path.is_file():
        raise ExportError(f"{run_dir} is not a run dir of experiments.train: no .hydra/config.yaml")
    if not checkpoint_path.is_file():
        raise ExportError(f"{run_dir} has no final checkpoint (checkpoints/last.ckpt): did the run finish an epoch?")
    cfg = OmegaConf.load(config_path)
    try:
        checkpoint = torch.load(checkpoint_path, weights_only=True, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same answer
        raise ExportError(f"{checkpoint_path} is not a readable checkpoint ({type(error).__name__})") from None
    if (checkpoint.get("callbacks") or {}).get("QuantizationAwareTraining") is None:
        raise ExportError(f"{checkpoint_path} holds no quantization state: the run trained in float "
                          "(without callbacks.qat), there is nothing quantized to export")
    try:
        state = quantization_from_checkpoint(checkpoint)
        # The checkpoint records every quantizer's options and bits: the model comes back
        # exactly as it was evaluated, whatever the config's defaults say.
        model = restore_quantized(instantiate(cfg.model, _convert_="all"), checkpoint)
    except ValueError as error:
        raise ExportError(f"{checkpoint_path}: {error}") from None
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("test")
    return model, datamodule, state, checkpoint_path


def unexportable(model, run_dir: Path) -> str | None:
    """Why this run cannot be exported and evaluated here, in one line, or None."""
    from experiments.lm import LanguageModel

    if not isinstance(model, (Classifier, LanguageModel)):
        return (f"{run_dir} trained {type(model).__name__}, neither a classifier nor the language model: this command "
                "measures test accuracy or bits per byte; export the model in Python with torchapprox.export_onnx")
    return None


class Metric(NamedTuple):
    """The test metric of a run's task, measured in ONNX Runtime and in PyTorch."""

    name: str  # as printed
    key: str  # in metrics.json
    onnx: Callable[[Path, Any], float]
    torch: Callable[[Any, Any], float]


def metric_of(model) -> Metric:
    if isinstance(model, Classifier):
        return Metric("test accuracy", "test/acc", lambda path, loader: onnx_accuracy(path, loader)[0], torch_accuracy)
    return Metric("test bits per byte", "test/bpb", onnx_bits_per_byte,
                  lambda module, loader: module.evaluate(loader)["test/bpb"])


def _session(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name


def onnx_accuracy(path: Path, loader) -> tuple[float, np.ndarray]:
    session, name = _session(path)
    predictions, labels = [], []
    for x, y in loader:
        predictions.append(session.run(None, {name: x.numpy()})[0].argmax(axis=1))
        labels.append(y.numpy())
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    return float((predictions == labels).mean()), predictions


def onnx_bits_per_byte(path: Path, loader) -> float:
    """The language model's cross-entropy over every byte of ``loader``, in bits."""
    session, name = _session(path)
    total, count = 0.0, 0
    for x, y in loader:
        logits = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return total / count / math.log(2)


@torch.no_grad()
def torch_predictions(model, loader) -> np.ndarray:
    return np.concatenate([model(x).argmax(dim=1).numpy() for x, _ in loader])


def torch_accuracy(model, loader) -> float:
    return float((torch_predictions(model, loader) == np.concatenate([y.numpy() for _, y in loader])).mean())


def export_float(model, example: torch.Tensor, path: Path) -> Path:
    import copy

    float_model = copy.deepcopy(model)
    ta.detach(float_model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(float_model.eval(), (example,), str(path), dynamo=True, opset_version=21,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
    strip_debug_info(path)
    return path


def latency(paths: dict[str, Path], example: np.ndarray, rounds: int = 200, threads: int = 1) -> dict[str, float]:
    """Median milliseconds per run of each model on ``example``, the models interleaved, each
    session on ``threads`` intra-op threads (pinned: ONNX Runtime's default, one per core,
    makes the figures depend on whatever else the machine runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for name, p in paths.items()}
    feeds = {name: {s.get_inputs()[0].name: example} for name, s in sessions.items()}
    for name, session in sessions.items():
        for _ in range(10):
            session.run(None, feeds[name])
    samples = {name: [] for name in sessions}
    names = list(sessions)
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feeds[name])
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def ort_quantize_static(float_path: Path, loader, scratch: Path, batches: int = 16) -> Path:
    """ONNX Runtime's own post-training quantization of the float model: QDQ, uint8
    activations, int8 per-channel weights, min/max ranges calibrated on ``batches`` batches
    of ``loader`` (the run's training split)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: x.numpy()} for x, *_ in itertools.islice(loader, batches)])

        def get_next(self):
            return next(self.batches, None)

    prepared = scratch / "float_prepared.onnx"
    quant_pre_process(str(float_path), str(prepared))
    out = scratch / "ort_static.onnx"
    quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out


def comparison_table(paths: dict[str, Path], loader, threads: int, metric: Metric) -> str:
    """A Markdown table: each model's file size, test metric and ONNX Runtime latency at
    batch 1 and 64 (medians of interleaved runs), beside the float model's."""
    samples = torch.cat([x for x, *_ in loader])
    batch64 = samples[:64].numpy()
    timings = {batch: latency(paths, batch64[:batch], threads=threads) for batch in (1, 64)}
    sizes = {name: p.stat().st_size / 1024 for name, p in paths.items()}
    rows = [f"ONNX Runtime, CPU provider, {threads} thread(s); latency: median of interleaved runs",
            f"| model | file KiB (x float) | {metric.name} | batch 1 ms (x float) | batch 64 ms (x float) |",
            "|---|---|---|---|---|"]
    for name, p in paths.items():
        accuracy = metric.onnx(p, loader)
        cells = [f"{timings[b][name]:.3f} ({timings[b][name] / timings[b]['float']:.2f}x)" for b in (1, 64)]
        rows.append(f"| {name} | {sizes[name]:.1f} ({sizes[name] / sizes['float']:.2f}x) | {accuracy:.4f} | "
                    f"{cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def write_assignment(assignment: dict, path: Path) -> Path:
    """``{layer: {"multiplier", "input_signed", "cost", metrics..., "table_sha256"}}`` as JSON,
    for hardware flows (the table's hash identifies a table from a file)."""
    import hashlib

    entries = {layer: {"multiplier": m.name, "input_signed": m.input_signed, "cost": m.cost, **m.metrics(),
                       "table_sha256": hashlib.sha256(m.table.numpy().tobytes()).hexdigest()}
               for layer, m in assignment.items()}
    write_atomically(path, (json.dumps(entries, indent=2) + "\n").encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run dir of experiments.train (outputs/<time>)")
    parser.add_argument("--static", action="store_true", help="constant input scales (calibrated ranges)")
    parser.add_argument("--latency", action="store_true",
                        help="compare float, this QDQ model and (with --static) ONNX Runtime's own quantize_static "
                             "of the float model: file size, test accuracy, latency at batch 1 and 64")
    parser.add_argument("--int8-weights", action="store_true",
                        help="store weights of 4 bits or fewer in int8 (ONNX Runtime's integer kernels) instead of "
                             "packed INT4/UINT4 (half the size, computed in float)")
    parser.add_argument("--exact-products", action="store_true",
                        help="export layers that compute with an approximate multiplier with exact products (ONNX "
                             "has none); their assignment goes to RUN_DIR/multipliers.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads for --latency (default 1: figures that background "
                             "load does not move)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        print(f"Error: --threads must be an int >= 1, got {args.threads}", file=sys.stderr)
        return 2
    quiet_third_party()
    try:
        model, datamodule, state, checkpoint_path = load_run(args.run_dir)
    except ExportError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    refusal = unexportable(model, args.run_dir)
    approximate = ta.assigned_multipliers(model)
    if approximate and not args.exact_products and not refusal:
        names = ", ".join(f"{layer} ({m.name})" for layer, m in list(approximate.items())[:8])
        refusal = (f"ONNX cannot express an approximate product, and these layers compute with one: {names}"
                   f"{' ...' if len(approximate) > 8 else ''}; pass --exact-products to export them with exact "
                   "products (the assignment goes to multipliers.json beside the model)")
    if refusal:
        print(f"Error: {refusal}", file=sys.stderr)
        return 2
    test_loader = datamodule.test_dataloader()
    example = next(iter(test_loader))[0]
    frozen = [q for q in ta.quantizer_state(model) if q.endswith("static_range")]
    bits = sorted({q.bitwidth for q in model.modules() if isinstance(q, ta.ApproxQuantizer)})
    # Inputs whose ranges calibration can freeze (per-tensor min/max); learned steps are
    # constant scales already.
    calibratable = any(takes_static_range(q) for q in input_quantizers(model).values())
    learned = any(q.role == "input" and any(True for _ in q.parameters(recurse=False))
                  for q in input_quantizers(model).values())
    if args.static and not frozen and calibratable:
        ranges = calibrate(model, datamodule.train_dataloader())
        print(f"calibrated {len(ranges)} input ranges on the training split")
    elif not args.static:
        for quantizer in model.modules():
            if isinstance(quantizer, ta.MinMaxQuant) and quantizer.static_range is not None:
                quantizer.freeze_range(None)  # dynamic scales asked for
    metric = metric_of(model)
    torch_value = metric.torch(model, test_loader)
    try:
        path = export_onnx(model, example, args.run_dir / "model.onnx", exact_products=args.exact_products,
                           pack_weights=not args.int8_weights)
    except (ValueError, TypeError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    if approximate:
        assignment = write_assignment(approximate, args.run_dir / "multipliers.json")
        print(f"wrote {assignment}: the multiplier of each of {len(approximate)} layers; the ONNX model multiplies "
              "exactly, so its accuracy is the exact-product model's")
    onnx_value = metric.onnx(path, test_loader)
    metrics_path = args.run_dir / "metrics.json"
    recorded = json.loads(metrics_path.read_text()).get(metric.key) if metrics_path.is_file() else None
    running = any(isinstance(q, ta.MinMaxQuant) and q.stored_range() is not None for q in model.modules())
    scales = ("constant (learned)" if learned and not calibratable else "static (calibrated)" if args.static else
              "constant (running-average ranges)" if running else "dynamic (from each tensor's range)")
    print(f"wrote {path}: QDQ, {state['bitwidth']} bits{f' (per layer: {bits})' if len(bits) > 1 else ''}, "
          f"{scales} input scales (from {checkpoint_path.name}, epoch {state['epoch']})")
    per_token = any(isinstance(q, ta.ApproxQuantizer) and q.spec.granularity == "per_token" for q in model.modules())
    if per_token:
        print("inputs with one scale per token: rounded by float ops in the graph (QuantizeLinear takes one scale per "
              "tensor or per axis), so ONNX Runtime computes those layers in float, with dequantized weights")
    print(f"{metric.name}: ONNX Runtime {onnx_value:.4f}, PyTorch {torch_value:.4f}, metrics.json "
          f"{recorded if recorded is not None else 'n/a'}")
    storage = weight_storage(path)
    print(f"integer weights: {', '.join(f'{n} in {t.upper()}' for t, n in sorted(storage.items()))}"
          + (" (packed two per byte: ONNX Runtime computes those layers in float; --int8-weights for integer "
             "kernels)" if any(t in ("int4", "uint4") for t in storage) else ""))
    with tempfile.TemporaryDirectory() as scratch:
        float_path = export_float(model, example, Path(scratch) / "float.onnx")
        quantized_kb, float_kb = path.stat().st_size / 1024, float_path.stat().st_size / 1024
        print(f"file size: QDQ {quantized_kb:.1f} KiB, float {float_kb:.1f} KiB ({float_kb / quantized_kb:.2f}x smaller)")
        if args.latency:
            paths = {"float": float_path, "ours": path}
            if any(t in ("int4", "uint4") for t in storage):
                paths["ours, int8 weights"] = export_onnx(model, example, Path(scratch) / "int8.onnx",
                                                          exact_products=args.exact_products, pack_weights=False)
            if args.static:
                try:
                    paths["ORT quantize_static"] = ort_quantize_static(float_path, datamodule.train_dataloader(),
                                                                       Path(scratch))
                except Exception as error:  # noqa: BLE001 - ORT's tool failing is reported, not fatal
                    print(f"ORT quantize_static failed on the float model ({type(error).__name__}: {error}); "
                          "it is left out of the comparison")
            print(comparison_table(paths, test_loader, args.threads, metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
