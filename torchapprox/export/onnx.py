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

from ..approximation import assigned_multipliers, remove_multiplier
from ..layers.functional import quantizer_of
from ..qat import quantized_layers, quantized_tensor_names
from ..quantizers import ApproxQuantizer
from ..quantizers.qparams import QParams, levels
from ..statistics import _LEGACY_ATTR
from ..validation import check_bool
from . import ops

_ONNX_TYPES = {torch.int8: 3, torch.uint8: 2, torch.int16: 5, torch.uint16: 4}  # onnx.TensorProto


class _ExportedWeight(ApproxQuantizer):
    """A weight's integer levels and step, frozen at export: ``DequantizeLinear(q, step, 0)``."""

    def __init__(self, quantizer: ApproxQuantizer, weight: Tensor, where: str) -> None:
        super().__init__(quantizer.spec, role="weight")
        with torch.no_grad():
            qp = quantizer.qparams(weight).detach()
            level = levels(weight, qp)
        ops.check_grid(quantizer.bitwidth, quantizer.grid, where)
        low, high = (int(level.min()), int(level.max())) if level.numel() else (0, 0)
        dtype = ops.container(min(low, 0, qp.qmin), max(high, 0))
        kept = [d for d, size in enumerate(qp.scale.shape) if size > 1]
        if len(kept) > 1:  # a grouped ConvTranspose: one scale per group and column
            self.axis, step = ops.ELEMENTWISE, qp.scale
        else:
            self.axis = kept[0] if kept else -1
            step = qp.scale.reshape(-1) if kept else qp.scale.reshape(())
        zero = torch.zeros_like(step) if qp.zero_point is None else qp.zero_point.reshape(step.shape)
        self.register_buffer("levels", level.to(dtype))
        self.register_buffer("step", step.float())
        # An explicit zero point: ORT fuses a weight's DequantizeLinear into its integer
        # kernels only with one.
        self.register_buffer("zero", zero.to(dtype))
        self._qparams = QParams(self.step, qp.qmin, qp.qmax, constant=True, channels=qp.channels)

    def compute_qparams(self, x: Tensor) -> QParams:
        return self._qparams

    def fake_quantize(self, x: Tensor) -> tuple[Tensor, QParams]:
        # x (the float weight) is not used: the exported graph holds the integers.
        value = torch.ops.torchapprox.dequantize(self.levels, self.step, self.zero, self.axis)
        return value.to(x.dtype), self._qparams


class _ExportedConstantInput(ApproxQuantizer):
    """An input whose parameters are constant (a calibrated or running range, a learned
    step), frozen at export into initializers; its levels in the tightest integer type."""

    def __init__(self, quantizer: ApproxQuantizer, qp: QParams, where: str) -> None:
        super().__init__(quantizer.spec, role="input")
        qmin, qmax = qp.qmin, qp.qmax
        zero = 0 if qp.zero_point is None else int(qp.zero_point)
        if qp.clip is not None:  # a frozen range fixes which levels occur (the auto grid's, too)
            qmin = max(qmin, int(torch.round(qp.clip[0] / qp.scale)) + zero)
            qmax = min(qmax, int(torch.round(qp.clip[1] / qp.scale)) + zero)
        if qp.clip is None:
            ops.check_grid(quantizer.bitwidth, quantizer.grid, where)
        try:
            ops.container(min(qmin, 0), max(qmax, 0))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        self.register_buffer("step", qp.scale.float())
        self.register_buffer("zero", None if qp.zero_point is None else qp.zero_point.float())
        clip = None
        if qp.clip is not None:
            self.register_buffer("low", qp.clip[0].float())
            self.register_buffer("high", qp.clip[1].float())
            clip = (self.low, self.high)
        self._qparams = QParams(self.step, min(qmin, 0), max(qmax, 0), self.zero, clip, constant=True,
                                may_clamp=qp.may_clamp)

    def compute_qparams(self, x: Tensor) -> QParams:
        return self._qparams


def _exported_input(quantizer: ApproxQuantizer, where: str) -> ApproxQuantizer:
    if quantizer.spec.granularity == "per_token":
        raise ValueError(f"{where}: an input quantized with one scale per token cannot be exported to ONNX QDQ "
                         "(QuantizeLinear takes one scale per tensor or per channel of a constant); "
                         "attach with per_token_inputs=False to export")
    with torch.no_grad():
        qp = quantizer.constant_qparams()
    if qp is not None:
        return _ExportedConstantInput(quantizer, qp.detach(), where)
    ops.check_grid(quantizer.bitwidth, quantizer.grid, where)
    return quantizer  # its parameters are computed in the graph, from each tensor, by its own code


def prepare_for_export(model: nn.Module, exact_products: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode whose weights are integer buffers and whose constant
    input parameters are frozen (see :mod:`torchapprox.export.ops`); with ``exact_products``,
    its layers multiply exactly (their approximate multipliers removed from the copy)."""
    if not quantized_layers(model):
        raise ValueError("`model` has no quantizers: attach(model) before exporting it")
    approximate = assigned_multipliers(model)
    if approximate and not exact_products:
        names = ", ".join(f"{layer} ({m.name})" for layer, m in list(approximate.items())[:8])
        raise ValueError(f"ONNX cannot express an approximate product, and these layers compute with one: {names}"
                         f"{' ...' if len(approximate) > 8 else ''}; pass exact_products=True to export the model "
                         "with exact products (and keep the assignment with torchapprox.approximation.multiplier_state)")
    exported = copy.deepcopy(model).eval()
    for module in exported.modules():
        remove_multiplier(module)
    exported.__dict__.pop(_LEGACY_ATTR, None)
    for module in exported.modules():
        if isinstance(module, ApproxQuantizer):
            module._collector = None  # nothing is recorded while exporting
    replaced: dict[int, ApproxQuantizer] = {}
    for layer_name, layer in exported.named_modules():
        weights, inputs = quantized_tensor_names(layer)
        for tensor in (*weights, *inputs):
            quantizer = quantizer_of(layer, tensor)
            if quantizer is None:
                continue
            where = f"{layer_name or 'model'}.{tensor}_quantizer"
            if id(quantizer) not in replaced:  # a tied weight's quantizer is replaced once
                if tensor in weights:
                    replaced[id(quantizer)] = _ExportedWeight(quantizer, getattr(layer, tensor), where)
                else:
                    replaced[id(quantizer)] = _exported_input(quantizer, where)
            setattr(layer, f"{tensor}_quantizer", replaced[id(quantizer)])
    return exported


def translation_table() -> dict:
    """ONNX translations of the export ops (onnxscript functions, opset 21)."""
    import onnx
    from onnxscript import opset21 as op

    def dequantize(q, scale, zero_point, axis: int):
        if axis == ops.ELEMENTWISE:
            return op.Mul(op.CastLike(q, scale), scale)
        return op.DequantizeLinear(q, scale, zero_point, axis=max(axis, 0))  # a per-tensor scale's axis is ignored

    def export_qdq(x, scale, zero_point, qmin: int, qmax: int, may_clamp: bool):
        dtype = ops.container(qmin, qmax)
        if zero_point is None:
            zero = op.Cast(op.Constant(value_int=0), to=_ONNX_TYPES[dtype])
            zero_float = op.CastLike(0.0, x)
        else:
            zero, zero_float = op.Cast(zero_point, to=_ONNX_TYPES[dtype]), zero_point
        low, high = next((lo, hi) for t, lo, hi in ops.CONTAINERS if t == dtype)
        if may_clamp and (qmin > low or qmax < high):
            # QuantizeLinear saturates to its type's range only: clamp to the grid's first.
            lower = op.Mul(op.Sub(op.CastLike(float(qmin), x), zero_float), scale)
            upper = op.Mul(op.Sub(op.CastLike(float(qmax), x), zero_float), scale)
            x = op.Clip(x, lower, upper)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)

    del onnx  # imported to fail early, with its own message, when it is missing
    return {
        torch.ops.torchapprox.dequantize.default: dequantize,
        torch.ops.torchapprox.export_qdq.default: export_qdq,
    }


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    exact_products: bool = False,
) -> Path:
    """Write ``model`` (attached with ``torchapprox.attach``) as an ONNX model in QDQ form.

    - every quantized weight is an integer initializer (int8 up to 8 bits, int16 up to 16;
      per-channel weights with the per-axis scales of ``DequantizeLinear``) followed by
      ``DequantizeLinear`` with an explicit zero point; biases stay float (on the int32
      accumulator grid where the input's parameters are constant);
    - every quantized input is a ``QuantizeLinear``/``DequantizeLinear`` pair in the
      smallest integer type that holds its levels: int8 for the signed grid, uint8 for the
      unsigned one (int16/uint16 above 8 bits; the "auto" grid, which picks per tensor,
      int8 up to 7 bits and int16 up to 15). The scale is computed in the graph from the
      tensor's own range, in float32 whatever the model's dtype (the quantizer's own torch
      code, recorded op by op), or is a constant initializer where the quantizer's
      parameters are constant (a calibrated or running range, a learned step), with a
      ``Clip`` to a calibrated range;
    - opset 21; the model's eval-mode computation, at its current bitwidths.

    ONNX Runtime's outputs equal the attached model's eval outputs up to float rounding:
    both compute ``clamp(round(x / scale)) * scale`` in float32 (half-precision models are
    cast to float32 around each quantization, as PyTorch computes them).

    Args:
        model: the attached model; it is not changed (a copy is exported).
        example_inputs: a tensor or a tuple of tensors, as the model is called.
        path: the ``.onnx`` file to write.
        dynamic_batch: the first dimension of every input may vary.
        input_names, output_names: names of the graph's inputs and outputs.
        exact_products: export a model whose layers compute with approximate multipliers
            (``ta.set_multiplier``) with exact products instead; without it such a model is
            refused (ONNX has no approximate product).

    Returns:
        ``path``.

    Raises:
        ValueError: a model without quantizers, a grid ONNX's integer types cannot hold
            (more than 16 bits; the "auto" grid at 16 bits), per-token input scales,
            per-channel scales along two dimensions (grouped ConvTranspose), float64
            parameters or inputs, or layers with approximate multipliers (without
            ``exact_products``), named.
        ImportError: ``onnx`` or ``onnxscript`` is not installed.
    """
    try:
        table = translation_table()
    except ImportError as error:
        raise ImportError(f"export_onnx needs onnx and onnxscript: pip install 'torchapprox[onnx]' ({error})") from None
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    _check_float_types(model, inputs)
    exported = prepare_for_export(model, check_bool(exact_products, "exact_products"))
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
