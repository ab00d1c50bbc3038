"""Export an attached model to ONNX in QDQ form, which ONNX Runtime, TensorRT and most NPU
compilers read: integer weight initializers followed by ``DequantizeLinear``, and a
``QuantizeLinear``/``DequantizeLinear`` pair on every quantized input.

Needs the ``onnx`` and ``onnxscript`` packages (``pip install torchapprox[onnx]``; add
``onnxruntime`` to run the result).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..approximation import assigned_multipliers, remove_multiplier
from ..batchnorm_fold import fold_of
from ..layers.folded import folded_weight
from ..layers import find_layer_type
from ..layers.functional import BIAS_LIMIT, quantized_bias, quantizer_of
from ..qat import quantized_layers, quantized_tensor_names
from ..quantizers import ApproxQuantizer
from ..quantizers.qparams import QParams, levels
from ..statistics import _LEGACY_ATTR
from ..validation import check_bool
from . import ops

_ONNX_TYPES = {torch.int8: 3, torch.uint8: 2, torch.int16: 5, torch.uint16: 4}  # onnx.TensorProto


class _ExportedWeight(ApproxQuantizer):
    """A weight's integer levels and step, frozen at export: ``DequantizeLinear(q, step, 0)``."""

    def __init__(self, quantizer: ApproxQuantizer, weight: Tensor, where: str, elementwise: bool = False,
                 unsigned: bool = False) -> None:
        super().__init__(quantizer.spec, role="weight")
        with torch.no_grad():
            qp = quantizer.qparams(weight).detach()
            level = levels(weight, qp)
        ops.check_grid(quantizer.bitwidth, quantizer.grid, where)
        low, high = (int(level.min()), int(level.max())) if level.numel() else (0, 0)
        dtype = ops.container(min(low, 0, qp.qmin), max(high, 0))
        kept = [d for d, size in enumerate(qp.scale.shape) if size > 1]
        if len(kept) > 1 or (elementwise and qp.zero_point is None):
            # A grouped ConvTranspose (one scale per group and column), or a layer whose input
            # is not QDQ (see prepare_for_export): Cast and Mul, not DequantizeLinear.
            self.axis, step = ops.ELEMENTWISE, qp.scale
        else:
            self.axis = kept[0] if kept else -1
            step = qp.scale.reshape(-1) if kept else qp.scale.reshape(())
        zero = torch.zeros_like(step) if qp.zero_point is None else qp.zero_point.reshape(step.shape)
        if unsigned and dtype == torch.int8 and self.axis != ops.ELEMENTWISE:
            # uint8 with zero point 128: the same values, and ONNX Runtime's u8u8 kernels,
            # which sum exactly on every CPU (u8s8 ones can saturate 16-bit pair sums
            # without VNNI).
            dtype, level, zero = torch.uint8, level + 128, zero + 128
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
    step), frozen at export into initializers; its levels in the tightest integer type.

    A calibrated range becomes a range of levels (``clamp(x, low, high)`` then rounding
    gives the same levels as rounding then clamping to ``round(low / step)`` ..
    ``round(high / step)``: rounding is monotone), so the exported input is
    ``QuantizeLinear``, an integer ``Clip`` where those levels are fewer than the type holds,
    ``DequantizeLinear``: the ``QuantizeLinear`` directly after the layer that produced the
    tensor, the pattern ONNX Runtime fuses into that layer's integer kernel.
    """

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
            ops.container(min(qmin, zero), max(qmax, zero))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        self.register_buffer("step", qp.scale.float())
        self.register_buffer("zero", None if qp.zero_point is None else qp.zero_point.float())
        if qmin < qmax:
            self._qparams = QParams(self.step, qmin, qmax, self.zero, None, constant=True, may_clamp=True)
        else:  # a calibrated range that holds one level (a tensor that was 0 throughout): clip in float
            self.register_buffer("low", qp.clip[0].float())
            self.register_buffer("high", qp.clip[1].float())
            self._qparams = QParams(self.step, qp.qmin, qp.qmax, self.zero, (self.low, self.high), constant=True,
                                    may_clamp=False)

    def compute_qparams(self, x: Tensor) -> QParams:
        return self._qparams


def _exported_input(quantizer: ApproxQuantizer, where: str) -> ApproxQuantizer:
    with torch.no_grad():
        qp = quantizer.constant_qparams()
    if qp is not None:
        return _ExportedConstantInput(quantizer, qp.detach(), where)
    ops.check_grid(quantizer.bitwidth, quantizer.grid, where)
    return quantizer  # its parameters are computed in the graph, from each tensor, by its own code


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _matmul_without_qdq_input(layer: nn.Module) -> bool:
    """Whether the layer is a matrix product (not a convolution) with a float input that is
    not exported as a QDQ pair (one scale per token, written as float ops; an input left in
    float). Its weight is then dequantized with Cast and Mul: ONNX Runtime would otherwise
    turn a lone weight DequantizeLinear + MatMul into its weight-only MatMulNBits kernel,
    which quantizes the activations on the fly and computes other numbers (0.18 of 0.67 on
    the LM's logits). torch.onnx's optimizer folds that Cast and Mul of constants into
    float32 values (on the grid) for small weights (4096 elements were folded)."""
    if isinstance(layer, _CONVOLUTIONS):
        return False
    return not _takes_qdq_input(layer)


def _takes_qdq_input(layer: nn.Module) -> bool:
    _, inputs = quantized_tensor_names(layer)
    layer_type = find_layer_type(layer)
    names = layer_type.inputs if layer_type is not None else inputs
    for name in names:
        quantizer = quantizer_of(layer, name)
        if quantizer is None or quantizer.spec.granularity == "per_token":
            return False
    return True


def prepare_for_export(model: nn.Module, exact_products: bool = False, unsigned_weights: bool = False) -> nn.Module:
    """A copy of ``model`` in eval mode whose weights are integer buffers and whose constant
    input parameters are frozen (see :mod:`torchapprox.export.ops`); with ``exact_products``,
    its layers multiply exactly (their approximate multipliers removed from the copy); with
    ``unsigned_weights``, 8-bit weights are uint8 with zero point 128."""
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
                    fold = fold_of(layer)
                    value = folded_weight(layer, fold) if fold is not None and tensor == "weight" else getattr(layer, tensor)
                    replaced[id(quantizer)] = _ExportedWeight(quantizer, value, where,
                                                              elementwise=_matmul_without_qdq_input(layer),
                                                              unsigned=unsigned_weights)
                else:
                    replaced[id(quantizer)] = _exported_input(quantizer, where)
            setattr(layer, f"{tensor}_quantizer", replaced[id(quantizer)])
        _check_bias_fits(layer_name, layer)
    return exported


@torch.no_grad()
def _check_bias_fits(layer_name: str, layer: nn.Module) -> None:
    """Where a bias on the accumulator grid has a channel whose level does not fit in int32
    (the layer keeps that channel's float bias, which ``DequantizeLinear`` of an int32
    cannot give), export the bias the layer computes as floats instead (raise for a folded
    bias, computed in the graph)."""
    weight, input = quantizer_of(layer, "weight"), quantizer_of(layer, "input")
    if not isinstance(weight, _ExportedWeight) or not isinstance(input, ApproxQuantizer):
        return
    if isinstance(input, _ExportedConstantInput):
        qp = input._qparams
    else:
        # A family whose constant parameters are computed in the graph (no stored range):
        # asked on a copy, since asking may initialise state (a learned step starts from
        # the first tensor it sees; the export must still say that it saw none).
        try:
            qp = copy.deepcopy(input).qparams(torch.zeros(1)).detach()
        except Exception:  # noqa: BLE001 - a family that cannot answer here: its export says why
            return
    if not qp.constant:
        return
    fold = fold_of(layer)
    bias = getattr(layer, "bias", None)
    if fold is not None:
        factor, shift = fold.factors()
        bias = shift if bias is None else shift + bias * factor
    if not isinstance(bias, Tensor) or qp.scale.dim() != 0 or qp.zero_point is not None:
        return
    step = qp.scale * weight._qparams.channel_scale()
    level = torch.round(bias.float() / step)
    if bool(torch.logical_and(level.abs() <= BIAS_LIMIT, torch.isfinite(level)).all()):
        return
    if fold is not None:
        raise ValueError(f"{layer_name or 'model'}: its folded bias does not fit in int32 at the accumulator's step "
                         "(input step times weight step), where the integer graph adds it; this happens with tiny "
                         "steps (16-bit inputs and weights): export at fewer bits or attach without fold_batchnorm")
    # Some channel keeps its float bias (quantized_bias): the graph adds the bias the layer
    # computes, every channel's value as a float constant, and no int32 bias.
    layer.bias = nn.Parameter(quantized_bias(layer.bias, weight._qparams, qp).detach(), requires_grad=False)
    if not isinstance(input, _ExportedConstantInput):
        input = _ExportedConstantInput(input, qp, f"{layer_name or 'model'}.input_quantizer")
        layer.input_quantizer = input
    input._qparams = input._qparams._replace(constant=False)


def translation_table() -> dict:
    """ONNX translations of the export ops (onnxscript functions, opset 21)."""
    import onnx
    from onnxscript import opset21 as op

    def dequantize(q, scale, zero_point, axis: int):
        if axis == ops.ELEMENTWISE:
            return op.Mul(op.CastLike(q, scale), scale)
        return op.DequantizeLinear(q, scale, zero_point, axis=max(axis, 0))  # a per-tensor scale's axis is ignored

    def export_qdq(x, scale, zero_point, qmin: int, qmax: int, may_clamp: bool):
        dtype, shift = ops.activation_container(min(qmin, 0), max(qmax, 0))
        onnx_type = _ONNX_TYPES[dtype]
        if zero_point is None:
            zero = op.Cast(op.Constant(value_int=shift), to=onnx_type)
        else:
            zero = op.Cast(op.Add(zero_point, op.CastLike(float(shift), zero_point)), to=onnx_type)
        low, high = next((lo, hi) for t, lo, hi in ops.CONTAINERS if t == dtype)
        narrower = may_clamp and (qmin + shift > low or qmax + shift < high)
        if narrower and dtype not in (torch.int8, torch.uint8):
            # ONNX Runtime has no 16-bit integer Clip: clamp x to the grid's range first.
            zero_float = op.CastLike(0.0, x) if zero_point is None else zero_point
            lower = op.Mul(op.Sub(op.CastLike(float(qmin), x), zero_float), scale)
            upper = op.Mul(op.Sub(op.CastLike(float(qmax), x), zero_float), scale)
            return op.DequantizeLinear(op.QuantizeLinear(op.Clip(x, lower, upper), scale, zero), scale, zero)
        q = op.QuantizeLinear(x, scale, zero)
        qmin, qmax = qmin + shift, qmax + shift
        if narrower:
            # QuantizeLinear saturates to its type's range only: clamp the levels to the
            # grid's (an integer Clip after it: the QuantizeLinear stays next to the layer
            # that produced x, where ONNX Runtime fuses it into an integer kernel).
            q = op.Clip(q, op.Cast(op.Constant(value_int=qmin), to=onnx_type),
                        op.Cast(op.Constant(value_int=qmax), to=onnx_type))
        return op.DequantizeLinear(q, scale, zero)

    def bias_on_grid(bias, step):
        levels = op.Cast(op.Round(op.Div(bias, step)), to=6)  # onnx.TensorProto.INT32
        return op.DequantizeLinear(levels, step, axis=0)  # a per-tensor step's axis is ignored

    del onnx  # imported to fail early, with its own message, when it is missing
    return {
        torch.ops.torchapprox.dequantize.default: dequantize,
        torch.ops.torchapprox.export_qdq.default: export_qdq,
        torch.ops.torchapprox.bias_on_grid.default: bias_on_grid,
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
    pack_weights: bool = True,
    unsigned_weights: bool = False,
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
        pack_weights: store the integer weights of layers at 4 bits or fewer in ONNX's
            INT4/UINT4 types, two per byte (the file about half the int8 one's size). ONNX
            Runtime dequantizes them and computes those layers in float: it fuses int8
            weights, not packed ones, into integer kernels, so ``pack_weights=False``
            (int8 containers) is the faster file. Where ONNX Runtime (when installed)
            cannot load the packed file, the weights stay int8 and a warning says so.
        unsigned_weights: int8 weights as uint8 with zero point 128 (the same values): ONNX
            Runtime then runs u8u8 integer kernels, whose sums are exact on every CPU. Its
            default u8s8 kernels sum pairs of products in 16 bits on x86 CPUs without VNNI,
            which 8-bit weights times uint8 activations can saturate (7-bit weights cannot);
            u8u8 ran 2.3x slower than u8s8 on the benchmark CNN on a VNNI CPU.
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
    _check_exportable_layers(model)
    exported = prepare_for_export(model, check_bool(exact_products, "exact_products"),
                                  check_bool(unsigned_weights, "unsigned_weights"))
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
        fold_relu_into_levels(temporary)
        if check_bool(pack_weights, "pack_weights"):
            _pack(temporary, low_bit_weight_names(exported))
        os.replace(temporary, path)  # one self-contained file, replaced atomically
    finally:
        temporary.unlink(missing_ok=True)
    return path


def low_bit_weight_names(exported: nn.Module) -> list[str]:
    """The names of the integer weight buffers of ``prepare_for_export``'s copy whose layers
    quantize at 4 bits or fewer (the ONNX initializers :func:`pack_low_bit_weights` packs)."""
    return [f"{name}.levels" if name else "levels" for name, module in exported.named_modules()
            if isinstance(module, _ExportedWeight) and module.bitwidth <= 4]


def _pack(path: Path, names: list[str]) -> None:
    if not names:
        return
    original = path.read_bytes()
    packed = pack_low_bit_weights(path, names)
    try:
        import onnxruntime
    except ImportError:
        return
    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - whatever ORT refuses, the int8 file is the answer
        path.write_bytes(original)
        warnings.warn(f"export_onnx: ONNX Runtime cannot run the {len(packed)} weights packed in INT4/UINT4 "
                      f"({str(error).splitlines()[0][:200]}); they are stored as int8", UserWarning, stacklevel=3)


def _check_exportable_layers(model: nn.Module) -> None:
    """Refuse what torch.onnx writes wrongly: average pooling with ``divisor_override``
    (exported as a plain average)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.AvgPool2d, nn.AvgPool3d)) and module.divisor_override is not None:
            raise ValueError(f"{name}: AvgPool with divisor_override={module.divisor_override} is exported by torch.onnx "
                             "as a plain average (other numbers); use divisor_override=None")


def _check_float_types(model: nn.Module, inputs: tuple) -> None:
    """ONNX's QuantizeLinear takes float32, float16 and bfloat16 only: refuse float64."""
    for name, tensor in [*(("example_inputs", t) for t in inputs), *model.named_parameters()]:
        if isinstance(tensor, Tensor) and tensor.dtype == torch.float64:
            raise ValueError(f"{name} is float64: ONNX's QuantizeLinear takes float32, float16 or bfloat16; "
                             "export model.float() with float32 inputs")


def fold_relu_into_levels(path: str | Path) -> int:
    """Drop each ``Relu`` whose only use is a ``QuantizeLinear`` and clamp the levels at the
    zero point instead (an integer ``Clip`` after the ``QuantizeLinear``): the same numbers
    (rounding is monotone and keeps 0 at the zero point), and the ``QuantizeLinear``
    directly after the layer before the ReLU, which ONNX Runtime then fuses into that
    layer's integer kernel (it drops such a ReLU itself only where the zero point is the
    type's minimum, not the signed grid's 128 in uint8). Returns how many were dropped."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dropped = 0
    for relu in [n for n in graph.node if n.op_type == "Relu"]:
        consumers = users.get(relu.output[0], [])
        if relu.output[0] in outputs or len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear":
            continue
        quantize = consumers[0]
        zero = constants.get(quantize.input[2]) if len(quantize.input) > 2 else None
        if zero is None or zero.size != 1:
            continue
        floor = zero.reshape(())  # the level of 0.0: where ReLU clamps
        after = users.get(quantize.output[0], [])
        clip = after[0] if len(after) == 1 and after[0].op_type == "Clip" else None
        if clip is not None and len(clip.input) > 1 and clip.input[1]:
            if clip.input[1] not in constants:
                continue
            floor = np.maximum(floor, constants[clip.input[1]].reshape(()).astype(floor.dtype))
        quantize.input[0] = relu.input[0]
        graph.node.remove(relu)
        dropped += 1
        if clip is None and floor == np.iinfo(zero.dtype).min:
            continue  # QuantizeLinear saturates there already
        # Clamp the levels below at the zero point: a Clip of the QuantizeLinear's output
        # (or a raised lower bound of the one there).
        zero_name = f"{quantize.output[0]}.relu_floor"
        graph.initializer.append(numpy_helper.from_array(np.asarray(floor, dtype=zero.dtype), zero_name))
        if clip is not None:
            while len(clip.input) < 2:
                clip.input.append("")
            clip.input[1] = zero_name
        else:
            clipped = f"{quantize.output[0]}.relu"
            for user in after:
                for index, name in enumerate(user.input):
                    if name == quantize.output[0]:
                        user.input[index] = clipped
            position = list(graph.node).index(quantize) + 1
            graph.node.insert(position, helper.make_node("Clip", [quantize.output[0], zero_name], [clipped]))
    if dropped:
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return dropped


PACKED_TYPES = {"int4": (22, -8, 7), "uint4": (21, 0, 15)}  # onnx.TensorProto INT4, UINT4: (type, low, high)


def pack_low_bit_weights(path: str | Path, names: Sequence[str]) -> list[str]:
    """Store the integer weight initializers ``names`` (and their zero points) in ONNX's
    INT4/UINT4 types, two levels per byte, where every level fits; the rest stay int8.
    Each weight's ``DequantizeLinear`` reads the packed tensor (opset 21). Returns the
    names packed. The file is rewritten in place and checked."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    wanted, packed = set(names), []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in wanted or node.input[0] not in initializers:
            continue
        levels = numpy_helper.to_array(initializers[node.input[0]]).astype(np.int32)
        zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.int32)
                if len(node.input) > 2 and node.input[2] in initializers else None)
        values = levels if zero is None else np.concatenate([levels.ravel(), zero.ravel()])
        kind = next((k for k, (_, low, high) in PACKED_TYPES.items()
                     if values.size and low <= values.min() and values.max() <= high), None)
        if kind is None:
            continue
        onnx_type = PACKED_TYPES[kind][0]
        name = f"{node.input[0]}.{kind}"
        graph.initializer.append(helper.make_tensor(name, onnx_type, levels.shape, _nibbles(levels), raw=True))
        node.input[0] = name
        if zero is not None:
            zero_name = f"{name}.zero"
            graph.initializer.append(helper.make_tensor(zero_name, onnx_type, zero.shape, _nibbles(zero), raw=True))
            node.input[2] = zero_name
        packed.append(name)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return packed


def _nibbles(values) -> bytes:
    """4-bit values packed two per byte, the first in the low nibble (ONNX's INT4/UINT4
    layout; a two's-complement nibble for negative values)."""
    import numpy as np

    flat = (values.ravel().astype(np.int64) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def weight_storage(path: str | Path) -> dict[str, int]:
    """How many integer weight initializers (inputs of ``DequantizeLinear``) the ONNX file
    holds per type: ``{"int8": 7, "int4": 0, ...}``."""
    import onnx

    model = onnx.load(str(path))
    types = {tensor.name: onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
             if tensor.data_type not in (21, 22) else ("uint4" if tensor.data_type == 21 else "int4")
             for tensor in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in types and types[node.input[0]] != "int32":
            counts[types[node.input[0]]] = counts.get(types[node.input[0]], 0) + 1
    return counts


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
