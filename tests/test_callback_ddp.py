"""QAT under DDP with 2 CPU processes: the quantized weights are identical on every rank."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_helpers import read_scalars

SCRIPT = Path(__file__).with_name("ddp_check.py")


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_quantized_weights_agree_across_ranks(tmp_path, strategy):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["bitwidth"] == rank1["bitwidth"] == 4
    for layer in ("net.0", "net.2"):
        assert torch.equal(rank0[layer], rank1[layer])
        scale = 7 / rank0[layer].abs().max()
        assert torch.allclose(rank0[layer] * scale, (rank0[layer] * scale).round(), atol=1e-4)
    scalars = read_scalars(tmp_path / "tb" / "version_0")
    # 64 samples over 2 ranks at batch 16: 2 steps per epoch, logged every step
    assert [step for step, _ in scalars["quant/net.0/input/mse"]] == [0, 1, 2, 3]
    assert [value for _, value in scalars["quant/bitwidth"]] == [8.0, 8.0, 4.0, 4.0]
