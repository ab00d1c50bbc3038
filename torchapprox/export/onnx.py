"""Export an attached model to ONNX in QDQ form, which ONNX Runtime, TensorRT and most NPU
compilers read: integer weight initializers followed by ``DequantizeLinear``, and a
``QuantizeLinear``/``DequantizeLinear`` pair on every quantized input.

Needs the ``onnx`` and ``onnxscript`` packages (``pip install torchapprox[onnx]``; add
``onnxruntime`` to run the result).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..qat import quantized_layers
from ..quantizers import ApproxQuantizer, MinMaxQuant, reference
from ..quantizers.minmax_quantizer import range_scale
from . import ops

_ONNX_TYPES = {torch.int8: 3, torch.uint8: 2, torch.int16: 5, torch.uint16: 4}  # onnx.TensorProto


class _ExportedWeight(ApproxQuantizer):
    """A weight's integer values and step, frozen at export: ``DequantizeLinear(q, step)``."""

    def __init__(self, quantizer: MinMaxQuant, weight: Tensor, where: str) -> None:
        super().__init__(quantizer.bitwidth)
        try:
            dtype = ops.container(quantizer.bitwidth, quantizer.grid)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        with torch.no_grad():
            scale = quantizer.compute_scale(weight)
            bounds = reference.grid_bounds(quantizer.bitwidth, quantizer.grid)
            levels = torch.clamp(torch.round(weight.detach().to(scale.dtype) / scale), *bounds)
        self.axis = -1 if quantizer.axis is None else quantizer.axis % weight.dim()
        self.register_buffer("levels", levels.to(dtype))
        self.register_buffer("step", (scale.reshape(-1) if scale.dim() else scale).float())

    def fake_quantize_with_scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # x (the float weight) is not used: the exported graph holds the integers.
        return torch.ops.torchapprox.dequantize(self.levels, self.step, self.axis).to(x.dtype), self.step

    def quantize(self, x: Tensor) -> Tensor:
        return self.levels.to(x.dtype)

    @property
    def scale_factor(self) -> Tensor:
        return 1.0 / self.step


class _ExportedInput(ApproxQuantizer):
    """An input's QDQ: with the scale of its own range, or of a frozen (calibrated) range."""

    def __init__(self, quantizer: MinMaxQuant, where: str) -> None:
        super().__init__(quantizer.bitwidth)
        if quantizer.axis is not None:
            raise ValueError(f"{where}: an input quantized with one scale per {quantizer.axis} cannot be exported to "
                             "ONNX QDQ (QuantizeLinear takes one scale per tensor or per channel of a constant); "
                             "attach with per_token_inputs=False to export")
        value_range = quantizer.stored_range()
        self.grid = quantizer.grid
        self.static = value_range is not None
        if self.static:
            step, lower, upper = range_scale(value_range.float(), self.bitwidth, self.grid)
            if self.grid == "auto":  # a frozen range fixes the grid too
                self.grid = "unsigned" if float(value_range[0]) >= 0 else "signed"
            # The very float32 values the quantizer computes with: ONNX gets the same numbers.
            self.low, self.high = float(lower), float(upper)
            self.register_buffer("step", step.float())
        try:
            ops.container(self.bitwidth, self.grid)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def fake_quantize_with_scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.static:
            x_fake = torch.ops.torchapprox.quantize_dequantize_static(x, self.step, self.low, self.high, self.bitwidth,
                                                                     self.grid)
            return x_fake, self.step
        return torch.ops.torchapprox.quantize_dequantize(x, self.bitwidth, self.grid), torch.ones(())

    def constant_scale(self) -> Tensor | None:
        return self.step if self.static else None

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError("an exported input quantizer only fake-quantizes")

    @property
    def scale_factor(self) -> None:
        return None


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose quantizers compute with the export ops."""
    if not quantized_layers(model):
        raise ValueError("`model` has no quantizers: attach(model) before exporting it")
    exported = copy.deepcopy(model).eval()
    replaced: dict[int, ApproxQuantizer] = {}
    for layer_name, layer in exported.named_modules():
        for child_name, child in list(layer.named_children()):
            if not isinstance(child, ApproxQuantizer):
                continue
            where = f"{layer_name or 'model'}.{child_name}"
            if not isinstance(child, MinMaxQuant):
                raise TypeError(f"{where}: only MinMaxQuant quantizers can be exported, got {type(child).__name__}")
            if id(child) not in replaced:  # a tied weight's quantizer is replaced once
                if child.role == "weight":
                    weight = getattr(layer, child_name[: -len("_quantizer")])
                    replaced[id(child)] = _ExportedWeight(child, weight, where)
                else:
                    replaced[id(child)] = _ExportedInput(child, where)
            setattr(layer, child_name, replaced[id(child)])
    return exported


def translation_table() -> dict:
    """ONNX translations of the export ops (onnxscript functions, opset 21)."""
    import onnx
    from onnxscript import opset21 as op

    def dequantize(q, scale, axis: int):
        return op.DequantizeLinear(q, scale, axis=max(axis, 0))  # the axis of a per-tensor scale is ignored

    def _qdq(x, step, bitwidth: int, grid: str):
        dtype = _ONNX_TYPES[ops.container(bitwidth, grid)]
        zero = op.Cast(op.Constant(value_int=0), to=dtype)
        return op.DequantizeLinear(op.QuantizeLinear(x, step, zero), step, zero)

    def quantize_dequantize(x, bitwidth: int, grid: str):
        low = op.ReduceMin(x, keepdims=0)
        high = op.ReduceMax(x, keepdims=0)
        if grid == "unsigned":
            top = op.Max(high, op.CastLike(0.0, x))
            level = op.CastLike(float(reference.unsigned_max(bitwidth)), x)
        else:
            top = op.Max(op.Neg(low), high)
            level = op.CastLike(float(reference.int_max(bitwidth)), x)
            if grid == "auto":
                unsigned = op.GreaterOrEqual(low, op.CastLike(0.0, x))
                level = op.Where(unsigned, op.CastLike(float(reference.unsigned_max(bitwidth)), x), level)
        tiny = op.CastLike(float(torch.finfo(torch.float32).tiny), x)
        step = op.Where(op.Greater(top, op.CastLike(0.0, x)), op.Max(op.Div(top, level), tiny), op.CastLike(1.0, x))
        return _qdq(x, step, bitwidth, grid)

    def quantize_dequantize_static(x, step, low: float, high: float, bitwidth: int, grid: str):
        clipped = op.Clip(x, op.CastLike(low, x), op.CastLike(high, x))
        return _qdq(clipped, op.CastLike(step, x), bitwidth, grid)

    del onnx  # imported to fail early, with its own message, when it is missing
    return {
        torch.ops.torchapprox.dequantize.default: dequantize,
        torch.ops.torchapprox.quantize_dequantize.default: quantize_dequantize,
        torch.ops.torchapprox.quantize_dequantize_static.default: quantize_dequantize_static,
    }


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` (attached with ``torchapprox.attach``) as an ONNX model in QDQ form.

    - every quantized weight is an integer initializer (int8 up to 8 bits, int16 up to 16;
      per-channel weights with the per-axis scales of ``DequantizeLinear``) followed by
      ``DequantizeLinear``; biases stay float;
    - every quantized input is a ``QuantizeLinear``/``DequantizeLinear`` pair with zero point
      0: int8 for the signed grid, uint8 for the unsigned one (int16/uint16 above 8 bits;
      the "auto" grid, which picks per tensor, int8 up to 7 bits and int16 up to 15). The
      scale is computed in the graph from the tensor's own range (``MinMaxQuant``'s dynamic
      semantics), or is a constant where the quantizer has a frozen or running range
      (``torchapprox.calibrate``), with a ``Clip`` to that range;
    - opset 21; the model's eval-mode computation, at its current bitwidths.

    ONNX Runtime's outputs equal the attached model's eval outputs up to float rounding
    (ONNX divides by the step where the quantizer multiplies by the scale factor; at a
    rounding tie a value may land one level apart).

    Args:
        model: the attached model; it is not changed (a copy is exported).
        example_inputs: a tensor or a tuple of tensors, as the model is called.
        path: the ``.onnx`` file to write.
        dynamic_batch: the first dimension of every input may vary.
        input_names, output_names: names of the graph's inputs and outputs.

    Returns:
        ``path``.

    Raises:
        ValueError: a model without quantizers, a grid ONNX's integer types cannot hold
            (more than 16 bits; the "auto" grid at 16 bits), per-token input scales, or
            float64 parameters or inputs.
        TypeError: a quantizer other than ``MinMaxQuant``.
        ImportError: ``onnx`` or ``onnxscript`` is not installed.
    """
    try:
        table = translation_table()
    except ImportError as error:
        raise ImportError(f"export_onnx needs onnx and onnxscript: pip install 'torchapprox[onnx]' ({error})") from None
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    _check_float_types(model, inputs)
    exported = prepare_for_export(model)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(t, Tensor) and t.dim() else None for t in inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's own deprecation and fallback chatter
            torch.onnx.export(
                exported, inputs, str(temporary), dynamo=True, opset_version=21, custom_translation_table=table,
                dynamic_shapes=dynamic_shapes, input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None, external_data=False, verbose=False,
            )
        strip_debug_info(temporary)
        os.replace(temporary, path)  # one self-contained file, replaced atomically
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _check_float_types(model: nn.Module, inputs: tuple) -> None:
    """ONNX's QuantizeLinear takes float32, float16 and bfloat16 only: refuse float64."""
    for name, tensor in [*(("example_inputs", t) for t in inputs), *model.named_parameters()]:
        if isinstance(tensor, Tensor) and tensor.dtype == torch.float64:
            raise ValueError(f"{name} is float64: ONNX's QuantizeLinear takes float32, float16 or bfloat16; "
                             "export model.float() with float32 inputs")


def strip_debug_info(path: str | Path) -> None:
    """Drop what torch.onnx records for debugging on every node (the FX node, the module
    path, the stack: more bytes than the int8 weights of a small model), then check it."""
    import onnx

    model = onnx.load(str(path))
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
