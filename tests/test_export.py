"""ONNX export in QDQ form, run for real in ONNX Runtime, and static (calibrated) scales."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchapprox as ta

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INT8, UINT8, INT16 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16


def run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)[0]


def assert_same_numbers(actual, expected, rows_apart_at_most=0.01):
    """The quantizers compute ONNX's arithmetic, so outputs agree to float rounding, except
    where a float difference in a conv or matmul (ORT's kernels are not torch's) moves a
    value across a rounding boundary of the next quantizer: one level, in a few rows."""
    scale = np.abs(expected).max()
    difference = np.abs(actual - expected)
    rows_apart = (difference.max(axis=1) > 1e-4 * scale).mean()
    assert rows_apart <= rows_apart_at_most, f"{rows_apart:.1%} of the rows differ"
    assert difference.max() <= 0.02 * scale


def assert_same_predictions(actual, expected):
    """argmax agrees wherever the top two logits are not tied: at 2-3 bits logits sit on a
    coarse lattice, and an exact tie is decided by float rounding in either runtime."""
    top2 = np.sort(expected, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 1e-4 * np.abs(expected).max()
    assert (actual.argmax(1) == expected.argmax(1))[decided].all()


def initializer_types(path):
    model = onnx.load(str(path))
    return {i.name: i.data_type for i in model.graph.initializer}, [n.op_type for n in model.graph.node]


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x))))).flatten(1))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def train_digits(bits, digits, **attach):
    torch.manual_seed(0)
    model = DigitsNet()
    ta.attach(model, bits, **attach)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    (x, y), _ = digits
    for _ in range(4):
        for start in range(0, len(x), 64):
            loss = F.cross_entropy(model(x[start:start + 64]), y[start:start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("bits, attach, static", [
    (8, {}, False),
    (4, {"activation_grid": "auto", "per_channel_weights": True}, False),
    (8, {"activation_grid": "unsigned"}, True),
    (3, {"activation_grid": "auto"}, True),
])
def test_digits_cnn_runs_in_onnx_runtime_with_the_trained_numbers(bits, attach, static, digits, tmp_path):
    model = train_digits(bits, digits, **attach)
    (x_train, _), (x_test, y_test) = digits
    if static:
        ta.calibrate(model, [x_train[i:i + 64] for i in range(0, 640, 64)])
    path = ta.export_onnx(model, x_test[:64], tmp_path / "model.onnx", pack_weights=False)
    with torch.no_grad():
        expected = model(x_test)
    actual = run_onnx(path, x_test)  # the whole split at once: the batch dimension is dynamic
    # A few rows a level apart: ORT's conv sums in another order than torch's (how many
    # depends on the CPU's kernels: 1.0% of rows on an AVX-512 VNNI machine).
    assert_same_numbers(actual, expected.numpy(), rows_apart_at_most=0.02)
    assert_same_predictions(actual, expected.numpy())  # identical predictions on the test split
    assert (actual.argmax(1) == y_test.numpy()).mean() > 0.8
    types, ops = initializer_types(path)
    for name in ("conv1", "conv2", "head"):
        assert types[f"{name}.weight_quantizer.levels"] == INT8  # integer weights, then DequantizeLinear
        assert f"{name}.weight" not in types  # no float copy of them
    # Constant input scales: each bias is an int32 DequantizeLinear at the accumulator's step.
    biases = 3 if static else 0
    assert ops.count("QuantizeLinear") >= 3
    assert ops.count("DequantizeLinear") == ops.count("QuantizeLinear") + 3 + biases
    assert ("ReduceMax" in ops) != static  # constant scales, or computed in the graph
    # A calibrated range of fewer levels than the integer type holds clips them (an integer
    # Clip); at 8 bits the unsigned grid is the whole uint8 range and QuantizeLinear saturates.
    assert not static or bits == 8 or "Clip" in ops


def test_integer_types_follow_the_bitwidth_and_the_grid(tmp_path):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    ta.attach(model, 12, bitwidth_overrides={"2": 8}, activation_grid="unsigned", per_channel_weights=True)
    ta.calibrate(model, [torch.randn(8, 6)])
    path = ta.export_onnx(model, x, tmp_path / "m.onnx")
    types, _ = initializer_types(path)
    assert types["0.weight_quantizer.levels"] == INT16 and types["2.weight_quantizer.levels"] == INT8
    zero_points = [numpy_helper.to_array(i).dtype for i in onnx.load(str(path)).graph.initializer if i.data_type == UINT8]
    assert zero_points  # the unsigned grid's zero point (and levels) are uint8
    step = numpy_helper.to_array(next(i for i in onnx.load(str(path)).graph.initializer
                                      if i.name == "0.weight_quantizer.step"))
    assert step.shape == (5,)  # per-axis scales
    with torch.no_grad():
        assert np.allclose(run_onnx(path, x), model.eval()(x).numpy(), atol=1e-4)


class _ConvStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("options", [{}, {"per_channel_weights": True}, {"activation_grid": "auto"}])
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), (64,)),
    (_ConvStack, (2, 4, 4)),
])
def test_constant_scales_put_the_bias_on_the_accumulator_grid_as_the_runtime_does(make, shape, options, tmp_path):
    """With constant input scales ONNX Runtime runs integer kernels that add the bias as
    int32 at s_input * s_weight; the layers round it alike, so the outputs agree to float
    rounding in every row (with a float bias 4 seeds in 10 had a row off by a level)."""
    for seed in range(6):
        torch.manual_seed(seed)
        model = make()
        ta.attach(model, 4, **options)
        model.eval()
        ta.calibrate(model, [torch.randn(16, *shape) for _ in range(4)])
        x = torch.randn(32, *shape)
        path = ta.export_onnx(model, x[:2], tmp_path / f"m{seed}.onnx")
        with torch.no_grad():
            expected = model(x).numpy()
        actual = run_onnx(path, x)
        assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max(), seed


def test_bias_rounding_follows_the_input_scale_and_passes_the_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    model = nn.Sequential(layer)
    ta.attach(model, 4, per_channel_weights=True)
    x = torch.randn(5, 8)
    from torchapprox.layers import quantized_bias, quantized_weight_and_qparams
    _, weight_qparams = quantized_weight_and_qparams(layer)
    dynamic = layer.input_quantizer.qparams(x)
    assert quantized_bias(layer.bias, weight_qparams, dynamic) is layer.bias  # dynamic input scale: float bias
    ta.calibrate(model, [x])
    bias = quantized_bias(layer.bias, weight_qparams, layer.input_quantizer.qparams(x))
    step = (x.abs().max() / 7) * layer.weight.detach().abs().amax(dim=1) / 7  # s_input * s_weight, per channel
    assert torch.allclose(bias, torch.round(layer.bias.detach() / step) * step, rtol=1e-6)
    assert not torch.equal(bias, layer.bias)
    (grad,) = torch.autograd.grad(bias.sum(), layer.bias)
    assert torch.equal(grad, torch.ones(3))  # straight through
    with torch.no_grad():  # the layer uses it
        expected = nn.functional.linear(layer.input_quantizer(x), quantized_weight_and_qparams(layer)[0], bias)
        assert torch.equal(model(x), expected)


def test_multihead_attention_model(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Encoder().eval()
    ta.attach(model, 8, activation_grid="auto")
    x = torch.randn(5, 7, 16)
    path = ta.export_onnx(model, x, tmp_path / "attn.onnx")
    with torch.no_grad():
        expected = model(x).numpy()
    actual = run_onnx(path, x)
    # ORT computes attention as MatMul + Softmax, torch with scaled_dot_product_attention: more
    # values land on the other side of a rounding boundary of out_proj's input quantizer.
    assert_same_numbers(actual, expected, rows_apart_at_most=1.0)
    assert (actual.argmax(1) == expected.argmax(1)).all()
    types, ops = initializer_types(path)
    assert types["attn.in_proj_weight_quantizer.levels"] == INT8 and types["attn.out_proj.weight_quantizer.levels"] == INT8


@pytest.mark.parametrize("make, error, message", [
    (lambda: nn.Linear(3, 2), ValueError, "has no quantizers: attach"),
    (lambda: _attached(24, "signed"), ValueError, r"0\.weight_quantizer: a 24-bit signed grid does not fit ONNX"),
    (lambda: _attached(16, "auto"), ValueError, r"0\.input_quantizer: a 16-bit auto grid .* at most 15 bits"),
    (lambda: _attached(8, "signed").double(), ValueError, r"0\.weight is float64: ONNX's QuantizeLinear takes float32"),
])
def test_what_cannot_be_exported_is_refused_clearly(make, error, message, tmp_path):
    with pytest.raises(error, match=message):
        ta.export_onnx(make(), torch.randn(2, 3), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def _attached(bits, grid, **options):
    model = nn.Sequential(nn.Linear(3, 2))
    ta.attach(model, bits, activation_grid=grid, **options)
    return model


# ------------------------------------------------------------------------- static scales
def test_calibrate_freezes_min_max_over_the_batches_and_clips_outside():
    model = nn.Sequential(nn.Linear(2, 2))
    ta.attach(model, 4)
    batches = [torch.tensor([[-1.0, 2.0]]), (torch.tensor([[3.0, -0.5]]), torch.tensor([1])),
               torch.tensor([[0.5, 0.5]])]
    ranges = ta.calibrate(model, batches)
    assert ranges["0.input_quantizer"].tolist() == [-1.0, 3.0]
    quantizer = model[0].input_quantizer
    x = torch.tensor([[9.0, -0.4]])
    expected = torch.clamp(x, -3.0, 3.0)
    expected = torch.round(expected * 7 / 3) * 3 / 7  # the frozen scale 7 / 3, not x's own
    assert torch.allclose(quantizer.fake_quantize_with_scale(x)[0], expected)
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    assert set(ta.quantizer_state(model)) == {"0.input_quantizer.static_range"}
    with pytest.raises(ValueError, match="is `batches` empty"):
        ta.calibrate(model, [])


def test_the_callback_calibrates_at_the_end_and_the_ranges_survive_a_restart(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks import QuantizationAwareTraining
    from lit_helpers import TinyClassifier, make_trainer

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = TinyClassifier()
    qat = QuantizationAwareTraining(4, calibrate_batches=2)
    trainer = make_trainer(tmp_path, [qat, checkpoint], max_epochs=2)
    trainer.fit(model)
    ranges = ta.quantizer_state(model)
    assert set(ranges) == {"net.0.input_quantizer.static_range", "net.2.input_quantizer.static_range"}
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    saved = state["callbacks"]["QuantizationAwareTraining"]["quantization"]["tensors"]
    assert all(torch.equal(saved[k], ranges[k]) for k in ranges)
    fresh = TinyClassifier()
    make_trainer(tmp_path / "again", [QuantizationAwareTraining(4)]).test(
        fresh, ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)
    assert all(torch.equal(ta.quantizer_state(fresh)[k], ranges[k]) for k in ranges)


# --------------------------------------------------------------- from a run directory
def _app(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           env=env)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    # The default step schedule: 16, 8, then 4 bits. The export must come back at 4, not at
    # the schedule's first bits.
    result = _app("experiments.train", "trainer.max_epochs=3", "bits=4",
                  "callbacks.qat.calibrate_batches=4", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false",
                  f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("static", [False, True])
def test_export_from_a_run_dir(finished_run, static):
    result = _app("experiments.export", str(finished_run), *(["--static"] if static else []))
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((finished_run / "metrics.json").read_text())["test/acc"]
    line = next(line for line in result.stdout.splitlines() if line.startswith("test accuracy"))
    onnx_accuracy = float(line.split("ONNX Runtime ")[1].split(",")[0])
    torch_accuracy = float(line.split("PyTorch ")[1].split(",")[0])
    assert onnx_accuracy == pytest.approx(torch_accuracy, abs=1 / 270)
    if static:  # the run calibrated: its test metrics were taken with the same static scales
        assert torch_accuracy == pytest.approx(recorded, abs=1e-4)
    assert "file size: QDQ" in result.stdout and (finished_run / "model.onnx").is_file()
    assert "QDQ, 4 bits" in result.stdout  # the bits it was trained and tested at


def test_export_latency_pins_onnx_runtime_threads(finished_run):
    result = _app("experiments.export", str(finished_run), "--latency", "--threads", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 thread(s)" in result.stdout
    bad = _app("experiments.export", str(finished_run), "--threads", "0")
    assert bad.returncode == 2 and "--threads must be an int >= 1, got 0" in bad.stderr


def test_export_refuses_bad_run_dirs_and_float_runs_in_one_line(tmp_path):
    result = _app("experiments.export", str(tmp_path / "missing"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "is not a directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = _app("experiments.export", str(tmp_path / "empty"))
    assert result.returncode == 2 and "no .hydra/config.yaml" in result.stderr
    run_dir = tmp_path / "fp32"
    result = _app("experiments.train", "trainer.max_epochs=1", "~callbacks.qat", "~callbacks.progress_bar",
                  "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    result = _app("experiments.export", str(run_dir))
    assert result.returncode == 2 and "holds no quantization state" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_a_run_with_learned_steps_exports_static_and_timed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "lsq"
    result = _app("experiments.train", "trainer.max_epochs=2", "schedule=constant", "bits=4", "+quant=lsq",
                  "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    for flags in ([], ["--static", "--latency"]):
        exported = _app("experiments.export", str(run_dir), *flags)
        assert exported.returncode == 0, exported.stderr[-3000:]
        assert "constant (learned) input scales" in exported.stdout
        line = next(line for line in exported.stdout.splitlines() if line.startswith("test accuracy"))
        onnx_accuracy = float(line.split("ONNX Runtime ")[1].split(",")[0])
        torch_accuracy = float(line.split("PyTorch ")[1].split(",")[0])
        assert onnx_accuracy == pytest.approx(torch_accuracy, abs=1 / 270)
    assert "QDQ" in exported.stdout and "latency" in exported.stdout
