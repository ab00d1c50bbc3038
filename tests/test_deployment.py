"""Deployment: the exported graph runs as ONNX Runtime integer kernels and computes the
trained numbers; BatchNorm folded in training; packed 4-bit weights.

Exactness is checked on "dyadic" models: every scale a power of two (weights with a level
at the grid's top in each channel, BatchNorm factors powers of two, input ranges frozen at
powers of two), so that every float product and sum is exact in float32 in either runtime.
Then ONNX Runtime's integer kernels (int32 sums, requantized with the scale ratio) and
PyTorch's float computation must agree bit for bit, and any difference is a wrong level.
"""

from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta
from torchapprox.batchnorm_fold import folds
from torchapprox.export.onnx import weight_storage
from torchapprox.quantizers import reference

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

STEP = 2.0 ** -3  # every input quantizer's step


def sums_exactly_with_signed_weights() -> bool:
    """ONNX Runtime's u8s8 kernels sum pairs of products in 16 bits (saturating) on x86 CPUs
    without VNNI; there, 8-bit weights are exported unsigned (u8u8 kernels, exact)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


EXACT_U8S8 = sums_exactly_with_signed_weights()


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def optimized_ops(path, tmp_path):
    """The op types of the graph ONNX Runtime runs (after its fusions)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    # Extended: the QDQ fusions, without the layout changes that only this CPU can run.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


class Block(nn.Module):
    """conv-BN-ReLU, conv-BN, + the block's input, ReLU (a residual block)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def conv_stack(residual=False):
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
              nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    if residual:
        layers.append(Block(8))
    return nn.Sequential(*layers, nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def linear_stack():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


@torch.no_grad()
def make_dyadic(model, bits, generator):
    """Weights on a power-of-two grid with a top level in every channel, BatchNorm with
    power-of-two factors and dyadic statistics (see the module docstring)."""
    top = 2 ** (bits - 1) - 1
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight
            levels = torch.randint(-top, top + 1, w.shape, generator=generator).float()
            levels.view(w.shape[0], -1)[:, 0] = top  # max|w| = top * 2^-6 in every channel
            w.copy_(levels * 2.0 ** -6)
            if module.bias is not None:
                module.bias.copy_(torch.randint(-8, 9, module.bias.shape, generator=generator) * 2.0 ** -5)
        elif isinstance(module, nn.BatchNorm2d):
            module.eps = 0.0
            module.running_var.fill_(4.0)  # rsqrt exact
            module.weight.copy_(2.0 ** torch.randint(-1, 2, module.weight.shape, generator=generator).float())
            module.bias.copy_(torch.randint(-8, 9, module.bias.shape, generator=generator) * 2.0 ** -4)
            module.running_mean.copy_(torch.randint(-8, 9, module.running_mean.shape, generator=generator) * 2.0 ** -4)


def freeze_dyadic_ranges(model):
    """Every input range frozen so that the step is STEP (a calibrated range, as static scales are)."""
    for quantizer in model.modules():
        if isinstance(quantizer, ta.MinMaxQuant) and quantizer.role == "input":
            grid = quantizer.grid if quantizer.grid != "auto" else "unsigned"
            _, qmax = reference.grid_bounds(quantizer.bitwidth, grid)
            low = 0.0 if grid == "unsigned" else -qmax * STEP
            quantizer.freeze_range(torch.tensor([low, qmax * STEP]))


CASES = [(bits, grid, fold) for bits in (2, 4, 8) for grid in ("signed", "unsigned") for fold in (False, True)]


@pytest.mark.parametrize("bits, grid, fold", CASES)
@pytest.mark.parametrize("residual", [False, True])
def test_conv_bn_relu_stacks_compute_the_same_numbers_in_onnx_runtime(bits, grid, fold, residual, tmp_path):
    generator = torch.Generator().manual_seed(bits * 10 + residual)
    model = conv_stack(residual)
    make_dyadic(model, bits, generator)
    ta.attach(model, bits, activation_grid=grid, per_channel_weights=True, fold_batchnorm=fold,
              quantize_pooling=True, rules={"0": {"input": {"grid": "signed"}}})  # the image is signed
    if fold:
        assert len(folds(model)) == (5 if residual else 3)
    model.eval()
    freeze_dyadic_ranges(model)
    x = torch.randn(16, 3, 8, 8, generator=generator)
    with torch.no_grad():
        expected = model(x).numpy()
    unsigned = bits == 8 and not EXACT_U8S8
    for pack in (False, True):
        path = ta.export_onnx(model, x, tmp_path / f"model{pack}.onnx", pack_weights=pack, unsigned_weights=unsigned)
        np.testing.assert_array_equal(run(path, x), expected)
    # uint8 weights (zero point 128) are the same values, on u8u8 kernels
    path = ta.export_onnx(model, x, tmp_path / "unsigned.onnx", pack_weights=False, unsigned_weights=True)
    np.testing.assert_array_equal(run(path, x), expected)
    packed = weight_storage(tmp_path / "modelTrue.onnx")
    weights = 6 if residual else 4
    assert packed == ({"int4": weights} if bits <= 4 else {"int8": weights})


@pytest.mark.parametrize("bits, grid", [(bits, grid) for bits in (2, 4, 8) for grid in ("signed", "unsigned")])
def test_linear_stacks_compute_the_same_numbers_in_onnx_runtime(bits, grid, tmp_path):
    generator = torch.Generator().manual_seed(bits)
    model = linear_stack()
    make_dyadic(model, bits, generator)
    ta.attach(model, bits, activation_grid=grid, rules={"0": {"input": {"grid": "signed"}}})
    model.eval()
    freeze_dyadic_ranges(model)
    x = torch.randn(4, 7, 12, generator=generator)  # (batch, tokens, features): MatMul, not Gemm
    with torch.no_grad():
        expected = model(x).numpy()
    path = ta.export_onnx(model, x, tmp_path / "model.onnx", pack_weights=False,
                          unsigned_weights=bits == 8 and not EXACT_U8S8)
    np.testing.assert_array_equal(run(path, x), expected)


def test_the_optimized_graph_runs_convolutions_and_matmuls_as_integer_kernels(tmp_path):
    torch.manual_seed(0)
    model = conv_stack()
    x = torch.randn(32, 3, 8, 8)
    ta.attach(model, 8, per_channel_weights=True, fold_batchnorm=True, quantize_pooling=True)
    model.train()
    for _ in range(3):
        model(x)
    model.eval()
    ta.calibrate(model, [x])
    path = ta.export_onnx(model, x, tmp_path / "cnn.onnx")
    ops = optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 3 and not ops["Conv"] and not ops["FusedConv"], ops
    assert ops["QGemm"] == 1 and not ops["Gemm"], ops
    assert not ops["BatchNormalization"] and not ops["Relu"], ops  # folded; fused into the unsigned range

    mlp = linear_stack()
    ta.attach(mlp, 8)
    ta.calibrate(mlp, [torch.randn(8, 5, 12)])
    path = ta.export_onnx(mlp.eval(), torch.randn(2, 5, 12), tmp_path / "mlp.onnx")
    ops = optimized_ops(path, tmp_path)
    integer = ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["MatMulInteger"]
    assert integer == 3 and not ops["MatMul"], ops


def test_without_folding_batchnorm_stays_a_float_op_and_its_convolution_a_float_kernel(tmp_path):
    torch.manual_seed(0)
    model = conv_stack()
    x = torch.randn(8, 3, 8, 8)
    ta.attach(model, 8, quantize_pooling=True)
    ta.calibrate(model.eval(), [x])
    ops = optimized_ops(ta.export_onnx(model, x, tmp_path / "m.onnx"), tmp_path)
    assert ops["BatchNormalization"] == 3 and ops["QLinearConv"] == 0, ops


# ------------------------------------------------------------------ fold-BN training
def fake_quantize_weight(w, bits):
    top = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=tuple(range(1, w.dim()))) / top).detach()
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(len(scale), dtype=torch.int32), 0, -top, top)


def fake_quantize_input(x, bits):
    top = 2 ** (bits - 1) - 1
    return torch.fake_quantize_per_tensor_affine(x, float(x.abs().max()) / top, 0, -top, top)


def reference_forward(model, x, bits, batch_statistics):
    """Jacob et al. 2018's fold as torch.ao's ConvBn modules compute it, with torch's own
    fake-quant ops: fold with the running statistics, quantize, undo the fold and let
    BatchNorm normalise with the batch's statistics (training), or the folded layer (eval)."""
    layers, out, index = list(model), x, 0
    while index < len(layers):
        layer = layers[index]
        if isinstance(layer, nn.Linear):  # not folded: Linear + BatchNorm1d is not a fold
            out = F.linear(fake_quantize_input(out, bits), fake_quantize_weight(layer.weight, bits), layer.bias)
            index += 1
        elif isinstance(layer, nn.Conv2d):
            bn = layers[index + 1]
            factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = fake_quantize_weight(layer.weight * factor.reshape(-1, *[1] * (layer.weight.dim() - 1)), bits)
            xq = fake_quantize_input(out, bits)
            y = F.conv2d(xq, weight, None, layer.stride, layer.padding)
            shape = [1, -1] + [1] * (y.dim() - 2)
            bias = layer.bias if layer.bias is not None else torch.zeros_like(factor)
            if batch_statistics:
                out = bn(y / factor.reshape(shape) + bias.reshape(shape))
            else:
                out = y + (bn.bias + (bias - bn.running_mean) * factor).reshape(shape)
            index += 2
        else:
            out, index = layer(out), index + 1
    return out


def bn_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@torch.no_grad()
def randomize_batchnorm(model):
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.uniform_(-1.5, 1.5)
            module.bias.uniform_(-1, 1)


@pytest.mark.parametrize("bits", [4, 8])
def test_folded_training_matches_the_reference_in_values_gradients_and_statistics(bits):
    torch.manual_seed(0)
    model = bn_net()
    randomize_batchnorm(model)
    reference_model = copy.deepcopy(model)
    ta.attach(model, bits, per_channel_weights=True, activation_grid="signed", fold_batchnorm=True)
    assert folds(model) == {"0": "1", "3": "4"}
    x = torch.randn(16, 3, 8, 8)
    x_ours, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = model.train()(x_ours), reference_forward(reference_model.train(), x_reference, bits, True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_reference.grad, rtol=1e-4, atol=1e-5)
    ours = dict(model.named_parameters())
    for name, parameter in reference_model.named_parameters():
        torch.testing.assert_close(ours[name].grad, parameter.grad, rtol=1e-4, atol=1e-4, msg=name)
    for name, buffer in reference_model.named_buffers():  # the running statistics moved alike
        torch.testing.assert_close(dict(model.named_buffers())[name], buffer, msg=name)
    with torch.no_grad():
        evaluated = model.eval()(x)
        torch.testing.assert_close(evaluated, reference_forward(reference_model.eval(), x, bits, False),
                                   rtol=1e-5, atol=1e-5)
        ta.freeze_batchnorm(model)
        before = [b.clone() for b in model.buffers()]
        assert torch.equal(model.train()(x), evaluated)  # frozen: the folded layer, in training too
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))  # statistics stopped


def test_folds_survive_state_round_trips_and_detach_restores_batchnorm():
    torch.manual_seed(0)
    model = bn_net()
    randomize_batchnorm(model)
    float_model = copy.deepcopy(model).eval()
    ta.attach(model, 8, per_channel_weights=True, fold_batchnorm=True)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    ta.freeze_batchnorm(model)
    state = ta.quantization_state(model)
    assert state["batchnorm_folds"] == {"0": "1", "3": "4"} and state["batchnorm_frozen"] == ["0", "3"]
    restored = copy.deepcopy(float_model)
    ta.restore_quantization(restored, state)
    with torch.no_grad():
        assert torch.equal(restored(x), expected)
        assert torch.equal(copy.deepcopy(model)(x), expected)
        assert torch.equal(restored.train()(x), model.train()(x))  # frozen: running statistics in training too
    restored.eval(), model.eval()
    ta.detach(restored)
    with torch.no_grad():
        assert torch.equal(restored(x), float_model(x))  # BatchNorm computes on its own again
    weights_only = copy.deepcopy(float_model)
    ta.attach(weights_only, 8, per_channel_weights=True, fold_batchnorm=True, activations=False)
    with torch.no_grad():
        expected = weights_only(x)
        ta.detach(weights_only, bake=True)  # the folded grid values, unfolded: BatchNorm scales them back
        torch.testing.assert_close(weights_only(x), expected, rtol=1e-4, atol=1e-5)


def test_fold_requests_are_checked():
    with pytest.raises(ValueError, match="fold_batchnorm=True, which is for weights"):
        ta.attach(bn_net(), 8, input={"fold_batchnorm": True})
    with pytest.raises(TypeError, match="fold_batchnorm"):
        ta.attach(bn_net(), 8, fold_batchnorm="yes")
    with pytest.warns(UserWarning, match="found no Conv1d/2d/3d followed by BatchNorm"):
        ta.attach(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), 8, fold_batchnorm=True)  # not a fold

    class Branching(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    model = Branching()
    with pytest.raises(ValueError, match="torch.fx"):
        ta.attach(model, 8, fold_batchnorm=True)
    assert not ta.quantized_layers(model)  # all or nothing
    # A rule folds only the layers it matches.
    model = bn_net()
    ta.attach(model, 8, rules={"0": {"fold_batchnorm": True}})
    assert folds(model) == {"0": "1"}


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_inputs_export_as_float_ops_with_the_same_numbers(bits, tmp_path):
    """One scale per token has no QuantizeLinear form: the rounding is written as float ops
    and the weights dequantized with Cast and Mul (a lone weight DequantizeLinear + MatMul
    becomes ONNX Runtime's MatMulNBits, which quantizes activations on the fly)."""
    from experiments.lm import CharTransformer

    torch.manual_seed(bits)
    net = CharTransformer(context=16, dim=32, layers=2, heads=4)
    ta.attach(net, bits, weight={"granularity": "per_channel"}, input={"granularity": "per_token", "grid": "auto"},
              rules={"embed": {"bits": 8}, "head": {"bits": 8}, "position": {"bits": 8}})
    ids = torch.randint(0, 256, (6, 16))
    with torch.no_grad():
        expected = net.eval()(ids).numpy()
    path = ta.export_onnx(net, ids[:2], tmp_path / "lm.onnx")
    np.testing.assert_allclose(run(path, ids), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert not optimized_ops(path, tmp_path)["MatMulNBits"]


def test_pooling_that_integer_kernels_divide_otherwise_stays_unquantized(tmp_path):
    model = nn.Sequential(nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True), nn.Conv2d(4, 2, 1), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Flatten())
    assert ta.attach(model, 8, quantize_pooling=True, activation_grid="auto") == ["2", "4"]  # not the ceil_mode one
    x = torch.randn(8, 4, 7, 7)
    ta.calibrate(model.eval(), [x])
    path = ta.export_onnx(model, x, tmp_path / "pool.onnx")
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(run(path, x) - expected).max() <= 1e-3 * np.abs(expected).max()
    divided = nn.Sequential(nn.Conv2d(4, 2, 1), nn.AvgPool2d(2, divisor_override=3))
    ta.attach(divided, 8)
    with pytest.raises(ValueError, match="divisor_override=3 is exported by torch.onnx as a plain average"):
        ta.export_onnx(divided, x, tmp_path / "divided.onnx")


# ------------------------------------------------------------------ the callback and the app
def test_the_callback_folds_freezes_late_and_rebinds_replaced_batchnorm(tmp_path):
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks import QuantizationAwareTraining

    class Module(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
            self.means = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def on_train_epoch_end(self):
            self.means.append(self.net[1].running_mean.clone())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 6, 6), torch.randint(0, 2, (32,))), batch_size=8)
    module = Module()
    qat = QuantizationAwareTraining(8, weight={"fold_batchnorm": True, "granularity": "per_channel"},
                                    quantize_pooling=True, freeze_batchnorm=0.5, verbose=False)
    Trainer(max_epochs=4, callbacks=[qat], logger=False, enable_checkpointing=False, enable_progress_bar=False,
            default_root_dir=tmp_path).fit(module, data)
    assert folds(module) == {"net.0": "net.1"} and "net.3" in ta.quantized_layers(module)
    moved = [not torch.equal(a, b) for a, b in zip(module.means, module.means[1:])]
    assert moved == [True, False, False]  # statistics move in epochs 0-1 and are frozen from epoch 2 on

    # A BatchNorm replaced after attach (Lightning's sync_batchnorm does so when the strategy
    # sets up) sharing its parameters and buffers: the fold follows the module in the model.
    old = module.net[1]
    new = nn.BatchNorm2d(4)
    new.weight, new.bias, new.running_mean, new.running_var = old.weight, old.bias, old.running_mean, old.running_var
    module.net[1] = new
    from torchapprox.batchnorm_fold import fold_of, rebind

    assert rebind(module) == ["net.1"] and fold_of(module.net[0]).batchnorm is new
    assert fold_of(module.net[0]).frozen  # kept
    module.eval()
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        out = module(x)
        ta.detach(module)
        ta.attach(module, 8, weight={"fold_batchnorm": True, "granularity": "per_channel"}, input={"grid": "auto"},
                  quantize_pooling=True)
        assert torch.equal(module(x), out)  # the same folded layer, not the BatchNorm applied twice


def test_a_deploy_run_exports_beside_float_and_ort_quantize_static(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"

    def app(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=root, capture_output=True, text=True, timeout=600,
                              env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"})

    trained = app("experiments.train", "trainer.max_epochs=3", "bits=8", "schedule=constant", "+quant=deploy",
                  "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = app("experiments.export", str(run_dir), "--static", "--latency")
    assert exported.returncode == 0, exported.stderr[-3000:]
    line = next(line for line in exported.stdout.splitlines() if line.startswith("test accuracy"))
    assert float(line.split("ONNX Runtime ")[1].split(",")[0]) == float(line.split("PyTorch ")[1].split(",")[0])
    rows = [line for line in exported.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["float", "ours", "ORT quantize_static"], rows
    assert "integer weights: 4 in INT8" in exported.stdout
