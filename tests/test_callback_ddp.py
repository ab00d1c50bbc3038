"""QAT under DDP with 2 CPU processes: every rank computes with, and rank zero's checkpoint
holds, the same quantization."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_helpers import read_scalars

SCRIPT = Path(__file__).with_name("ddp_check.py")


def run_ddp(mode, strategy, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), mode, strategy, str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_quantized_weights_agree_across_ranks(tmp_path, strategy):
    rank0, rank1 = run_ddp("weights", strategy, tmp_path)
    assert rank0["bitwidth"] == rank1["bitwidth"] == 4
    for layer in ("net.0", "net.2"):
        assert torch.equal(rank0[layer], rank1[layer])
        scale = 7 / rank0[layer].abs().max()
        assert torch.allclose(rank0[layer] * scale, (rank0[layer] * scale).round(), atol=1e-4)
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    # 64 samples over 2 ranks at batch 16: 2 steps per epoch, logged every step
    assert [step for step, _ in scalars["quant/net.0/input/mse"]] == [0, 1, 2, 3]
    assert [value for _, value in scalars["quant/bitwidth"]] == [8.0, 8.0, 4.0, 4.0]


@pytest.mark.parametrize("mode, kind", [("running", "running_range"), ("calibrated", "static_range")])
def test_running_and_calibrated_ranges_are_reduced_across_ranks(tmp_path, mode, kind):
    """Each rank sees its own half of the data, so its ranges differ before the reduction."""
    rank0, rank1 = run_ddp(mode, "ddp", tmp_path)
    names = {f"net.0.input_quantizer.{kind}", f"net.2.input_quantizer.{kind}"}
    assert set(rank0["ranges"]) == set(rank1["ranges"]) == names
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    checkpoint = saved["callbacks"]["QuantizationAwareTraining"]["quantization"]["tensors"]
    for name in names:
        assert torch.equal(rank0["ranges"][name], rank1["ranges"][name])
        assert torch.equal(checkpoint[name], rank0["ranges"][name])  # what every rank evaluated with


def test_a_layer_that_runs_on_one_rank_neither_errors_nor_hangs(tmp_path):
    run_ddp("branch", "ddp_find_unused_parameters_true", tmp_path)
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    assert [step for step, _ in scalars["quant/extra/input/mse"]] == [0, 1, 2, 3]  # rank zero's, every step
    assert [step for step, _ in scalars["quant/net.0/input/mse"]] == [0, 1, 2, 3]
