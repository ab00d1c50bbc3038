"""The app under the real world: resume, signals, full disks, re-run and concurrent sweeps,
reproducibility, DDP, schedules that fit the run, divergence, bad data files, what a user
sees. Every test runs the real app in a subprocess (real signals, real files)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]
FAST = ["data=synthetic", "trainer.max_epochs=3", *QUIET]


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def app(*args, cwd, timeout=600, **kwargs):
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=kwargs.pop("env", env()), **kwargs)


def start(*args, cwd, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), **kwargs)


def wait_for(path: Path, process, timeout=180):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------- checkpoints and resume
def test_last_checkpoint_is_the_final_epoch_at_the_final_bitwidth(tmp_path):
    result = app(*FAST, "trainer.max_epochs=6", "schedule=linear", "bits=4", f"hydra.run.dir={tmp_path}/run",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    last = checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 5 and metrics["epochs"] == 6
    assert last["callbacks"]["QuantizationAwareTraining"]["bitwidth"] == metrics["bitwidth"] == 4


def test_resume_from_the_shell_continues_at_the_scheduled_bitwidth(tmp_path):
    # the first two epochs of the step schedule below are at 16 bits (a 2-epoch run cannot hold the
    # step schedule's three phases: its milestones would collide, which is an error)
    first = app(*FAST, "trainer.max_epochs=2", "schedule=constant", "bits=16",
                f"hydra.run.dir={tmp_path}/first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    # the full run: 6 epochs, 16 -> 8 -> 4 at epochs 0, 2, 4; it resumes at epoch 2 with 8 bits
    resumed = app(*FAST, "trainer.max_epochs=6", "schedule=step", f"ckpt_path={last}",
                  f"hydra.run.dir={tmp_path}/resumed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["epochs"] == 6 and metrics["bitwidth"] == 4
    assert "epoch 2, 16 -> 8 bits" in resumed.stderr + resumed.stdout
    assert checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["epoch"] == 5


@pytest.mark.parametrize("override, message", [
    ("+ckpt_pth=x.ckpt", "unknown top-level config key 'ckpt_pth'"),
    ("+lr=0.1", "unknown top-level config key 'lr'"),
    ("ckpt_path=/no/such.ckpt", "`ckpt_path` '/no/such.ckpt' is not a checkpoint file"),
    ("threads=0", "`threads` must be an int >= 1, got 0"),
])
def test_unknown_keys_and_bad_resume_paths_fail_in_one_line(override, message, tmp_path):
    result = app(*FAST, override, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error:")


# ----------------------------------------------------------------------- interruption
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_marked_interrupted_with_a_loadable_checkpoint(signum, status, tmp_path):
    run_dir = tmp_path / "run"
    process = start(*FAST, "trainer.max_epochs=400", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    time.sleep(1.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-3000:]
    marker = json.loads((run_dir / "interrupted.json").read_text())
    assert marker["signal"] == signal.Signals(signum).name and marker["epoch"] >= 1
    assert not (run_dir / "metrics.json").exists()
    assert checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] >= 0  # loadable, weights_only
    assert "resume with: python -m experiments.train ckpt_path=" in stderr
    if signum == signal.SIGTERM:  # and it resumes into its own dir without clobbering what is there
        config = (run_dir / ".hydra" / "config.yaml").read_text()
        resumed = app(*FAST, "trainer.max_epochs=400", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
                      "trainer.max_epochs=" + str(marker["epoch"] + 2), f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert (run_dir / ".hydra" / "config.yaml").read_text() == config  # the first attempt's config
        assert len(list(run_dir.glob(".hydra-*"))) == 1 and not (run_dir / "interrupted.json").exists()
        assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == marker["epoch"] + 2


def test_an_interrupted_sweep_writes_the_summary_of_its_finished_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = start("-m", *FAST, "schedule=linear", "trainer.max_epochs=2,400", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not list(sweep_dir.glob("*max_epochs=400*/checkpoints/last.ckpt")):  # the long job is running
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    summary = (sweep_dir / "summary.md").read_text()
    assert "| ok |" in summary and "| interrupted |" in summary


# ------------------------------------------------------------------------ atomic writes
def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_leaves_no_truncated_checkpoint_and_no_temporary_files(tmp_path):
    run_dir = tmp_path / "run"
    # 300 kB of file: less than one checkpoint of the CNN (about 1.1 MB)
    result = app("trainer.max_epochs=2", "schedule=linear", *QUIET, f"hydra.run.dir={run_dir}", cwd=tmp_path,
                 preexec_fn=_limit_file_size(300_000))
    assert result.returncode != 0
    leftovers = [p.name for p in run_dir.rglob("*") if p.is_file() and (p.suffix in (".tmp", ".ckpt"))]
    assert leftovers == [], leftovers  # no checkpoint written at all, rather than half of one
    assert not (run_dir / "metrics.json").exists()


def test_json_writes_on_a_full_disk_leave_nothing_behind(tmp_path):
    code = ("import sys; from pathlib import Path; from experiments.train import write_json\n"
            "try:\n    write_json(Path(sys.argv[1]) / 'metrics.json', {'x': 'y' * 100000})\n"
            "except OSError as error:\n    print('failed', error.errno)\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            env=env(), preexec_fn=_limit_file_size(10_000), timeout=120)
    assert result.stdout.startswith("failed"), result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ sweeps and run dirs
def test_rerunning_part_of_a_sweep_skips_finished_jobs_and_relabels_nothing(tmp_path):
    sweep_dir = tmp_path / "sweep"
    first = app("-m", *FAST, "schedule=constant", "bits=2,3", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {d.name: ((d / "metrics.json").read_bytes(), (d / ".hydra" / "overrides.yaml").read_bytes())
              for d in sweep_dir.iterdir() if d.is_dir()}
    second = app("-m", *FAST, "schedule=constant", "bits=3,4", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    for name, (metrics, overrides) in before.items():  # untouched, bytes and labels
        assert (sweep_dir / name / "metrics.json").read_bytes() == metrics
        assert (sweep_dir / name / ".hydra" / "overrides.yaml").read_bytes() == overrides
    rows = {d.name: json.loads((d / "metrics.json").read_text())["bitwidth"] for d in sweep_dir.iterdir() if d.is_dir()}
    assert sorted(rows.values()) == [2, 3, 4] and all(f"bits={b}" in name for name, b in rows.items())
    summary = (sweep_dir / "summary.csv").read_text()
    assert summary.count("\n") == 4  # header + three jobs


def test_two_runs_in_the_same_dir_at_once(tmp_path):
    run_dir = tmp_path / "run"
    first = start(*FAST, "trainer.max_epochs=300", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for(run_dir / "checkpoints" / "last.ckpt", first)
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    second = app(*FAST, "trainer.max_epochs=1", "schedule=constant", "seed=7", f"hydra.run.dir={run_dir}",
                 cwd=tmp_path)
    assert second.returncode == 2 and "another run (pid" in second.stderr and "is using" in second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("Error:")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["seed"] == 0  # the first run's results
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config
    again = app(*FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)  # a finished dir is refused, untouched
    assert again.returncode == 2 and "already holds the results" in again.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config


def test_sweep_summary_command_rebuilds_the_summary(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = app("-m", *FAST, "schedule=constant", "bits=2,4", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep_dir / name).unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "experiments.sweep_summary", str(sweep_dir)], cwd=ROOT,
                             capture_output=True, text=True, env=env(), timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert all((sweep_dir / n).is_file() for n in ("summary.csv", "summary.md", "summary.png"))
    assert "2 jobs: 2 finished" in rebuilt.stdout
    bad = subprocess.run([sys.executable, "-m", "experiments.sweep_summary", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, env=env(), timeout=120)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr


def test_same_seed_and_config_give_the_same_metrics_whatever_the_launcher_and_cores(tmp_path):
    single = app(*FAST, f"hydra.run.dir={tmp_path}/single", cwd=tmp_path, env=env(OMP_NUM_THREADS="2"))
    assert single.returncode == 0, single.stderr[-3000:]
    swept = app("-m", *FAST, "hydra/launcher=joblib", "seed=0", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path,
                env=env(OMP_NUM_THREADS="1"))
    assert swept.returncode == 0, swept.stderr[-3000:]
    job = next(d for d in (tmp_path / "sweep").iterdir() if d.is_dir())
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert json.loads((job / "metrics.json").read_text()) == single_metrics
    assert single_metrics["threads"] == 1


def test_ddp_in_a_sweep_writes_one_summary_and_tests_every_sample_once(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # 505 samples: a 76-sample test split, which a 2-rank sampler would pad to 78
    result = app("-m", *FAST, "trainer=ddp_cpu", "trainer.max_epochs=2", "schedule=linear", "data.num_samples=505",
                 "bits=4,8",
                 f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sweep summary:") == 1
    rows = (sweep_dir / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    for job in (d for d in sweep_dir.iterdir() if d.is_dir()):
        accuracy = json.loads((job / "metrics.json").read_text())["test/acc"]
        assert abs(accuracy * 76 - round(accuracy * 76)) < 1e-3  # a fraction of the 76 test samples


# ------------------------------------------------------------------ schedules, divergence
def test_a_schedule_that_cannot_reach_its_bits_stops_before_training(tmp_path):
    result = app(*FAST, "schedule=linear", "schedule.end_epoch=20", "trainer.max_epochs=5",
                 f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2
    assert "reaches its final 4 bits at epoch 20, but the run ends after epoch 4" in result.stderr


def test_config_schedules_reach_the_bits_of_a_short_run(tmp_path):
    result = app(*FAST, "trainer.max_epochs=2", "schedule=linear", "bits=3", f"hydra.run.dir={tmp_path}/run",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bitwidth"] == 3
    # The step schedule's three phases cannot fit two epochs: an error, not a vanished phase.
    result = app(*FAST, "trainer.max_epochs=2", "bits=3", f"hydra.run.dir={tmp_path}/step", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "Error: ValueError: milestones 33% and 67% both fall on epoch 1 of a 2-epoch run")


def test_divergence_without_a_logger_fails_the_run(tmp_path):
    result = app(*FAST, "~logger", "model.lr=1e20", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 1
    assert "training diverged" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["status"] == "failed"


def test_step_interval_on_an_unbounded_run(tmp_path):
    result = app(*FAST, "trainer.max_epochs=1", "+trainer.max_steps=8", "callbacks.qat.interval=step",
                 "schedule=constant", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    from lightning.pytorch import Trainer

    from callbacks import QuantizationAwareTraining
    from lit_helpers import TinyClassifier

    qat = QuantizationAwareTraining({0: 8, 3: 4}, interval="step", verbose=False)
    trainer = Trainer(max_epochs=-1, max_steps=6, callbacks=[qat], logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, accelerator="cpu")
    trainer.fit(TinyClassifier())  # estimated_stepping_batches is infinite here: no OverflowError
    assert qat.bitwidth == 4


# ---------------------------------------------------------------------------- data files
def _npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda t: _npz(t, "nan.npz", x=np.full((60, 1, 8, 8), np.nan), y=np.zeros(60, int)), "NaN or infinite values"),
    (lambda t: _npz(t, "inf.npz", x=np.full((60, 1, 8, 8), np.inf), y=np.zeros(60, int)), "NaN or infinite values"),
    (lambda t: _npz(t, "labels.npz", x=np.zeros((60, 1, 8, 8)), y=np.full(60, 0.5)), "must be integers"),
    (lambda t: _npz(t, "few.npz", x=np.zeros((3, 1, 8, 8)), y=np.zeros(3, int)), "too few"),
    (lambda t: _npz(t, "empty.npz", x=np.zeros((0, 1, 8, 8)), y=np.zeros(0, int)), "holds no samples"),
    (lambda t: (np.save(t / "x.npy", np.zeros((60, 1, 8, 8))), t / "x.npy")[1], "not an .npz archive"),
])
def test_bad_data_files_are_refused_in_one_line_naming_data_path(make, message, tmp_path):
    path = make(tmp_path)
    result = app("data=file", f"data.path={path}", *QUIET, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error:") and "`data.path`" in last and message in last


# ------------------------------------------------------------------------ what users see
def test_a_run_ends_with_where_its_results_are_and_no_third_party_noise(tmp_path):
    result = app(*FAST, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"results: {tmp_path}/run (metrics.json" in output and f"tensorboard --logdir {tmp_path}/run" in output
    assert "quantized 99" in output  # the coverage line at the start
    for noise in ("LeafSpec", "\N{ELECTRIC LIGHT BULB}", "Tip:", "does not have many workers"):
        assert noise not in output, noise
    layout = _custom_scalars_layout(tmp_path / "run" / "tensorboard")
    titles = {chart.title for category in layout.category for chart in category.chart}
    assert "sqnr_db of every layer, weights" in titles and "net.classifier" in titles


def _custom_scalars_layout(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    event = accumulator.Tensors(metadata.CONFIG_SUMMARY_TAG)[0]
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


def test_readme_code_examples_run_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    assert len(blocks) >= 3
    for index, code in enumerate(blocks):
        script = tmp_path / f"example{index}.py"
        script.write_text(code)
        result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                                env=env(), timeout=600)
        assert result.returncode == 0, f"README example {index} failed:\n{code}\n{result.stderr[-3000:]}"
