"""The Hydra app: every config option composes, the pipeline runs, sweeps summarise, bad
configurations fail early. In-process where possible (fast), by subprocess where the shell
behaviour itself is the point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from callbacks import QuantizationAwareTraining
from callbacks.schedules import BitwidthSchedule
from experiments.sweep_summary import aggregate, collect_jobs, write_summary
from experiments.train import run
from lit_helpers import read_scalars

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAST = ["data=synthetic", "trainer.max_epochs=3", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def config(*overrides, hydra=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def app(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------ compose
@pytest.mark.parametrize("option", ["digits", "synthetic"])
def test_data_options_build_their_datamodule(option):
    datamodule = instantiate(config(f"data={option}").data, _convert_="all")
    datamodule.setup()
    x, y = datamodule.splits["train"].tensors
    assert x.shape[1:] == (1, 8, 8) and int(y.max()) == 9
    sizes = {name: len(split) for name, split in datamodule.splits.items()}
    total = sum(sizes.values())
    assert sizes["val"] == round(total * 0.15) and sizes["test"] == round(total * 0.15)


def test_digits_split_is_fixed_whatever_the_seed():
    first = instantiate(config("seed=1").data, _convert_="all")
    second = instantiate(config("seed=2").data, _convert_="all")
    first.setup(), second.setup()
    assert torch.equal(first.splits["test"].tensors[0], second.splits["test"].tensors[0])
    assert len(first.splits["train"]) + len(first.splits["val"]) + len(first.splits["test"]) == 1797


def test_file_data_reads_an_npz(tmp_path):
    import numpy as np

    path = tmp_path / "data.npz"
    np.savez(path, x=np.random.rand(40, 3, 5, 5).astype("float32"), y=np.arange(40) % 4)
    cfg = config("data=file", f"data.path={path}", "data.in_channels=3", "data.image_size=5", "data.num_classes=4")
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    assert datamodule.splits["train"].tensors[0].shape[1:] == (3, 5, 5)


@pytest.mark.parametrize("option", ["cnn", "mlp"])
def test_model_options_classify_digit_shaped_inputs(option):
    model = instantiate(config(f"model={option}").model, _convert_="all")
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["schedule=constant", "schedule.bits=3"], [3, 3, 3]),
        (["schedule=constant", "bits=6"], [6, 6, 6]),
        (["schedule=step"], [16] * 10 + [8] * 10 + [4] * 10),
        (["schedule=step", "schedule.milestones_percent.67=2"], [16] * 10 + [8] * 10 + [2] * 10),
        (["schedule=step", "trainer.max_epochs=9"], [16] * 3 + [8] * 3 + [4] * 3),  # fractions of the run
        (["schedule=linear", "bits=4"], [round(16 - 12 * e / 20 + 1e-9) for e in range(21)]),
        (["schedule=cosine", "schedule.end_epoch=2", "bits=8"], [16, 12, 8]),
        (["schedule=warmup", "bits=2"], [16] * 10 + [2] * 5),
    ],
)
def test_schedule_options(overrides, expected):
    schedule = instantiate(config(*overrides).schedule, _convert_="all")
    assert isinstance(schedule, BitwidthSchedule)
    assert [schedule(e) for e in range(len(expected))] == expected


def test_callbacks_compose_as_a_dict():
    cfg = config("callbacks.qat.exclude=[net.classifier]", "callbacks.qat.log_every_n_steps=7")
    qat = instantiate(cfg.callbacks.qat, _convert_="all")
    assert isinstance(qat, QuantizationAwareTraining)
    assert qat.exclude == ("net.classifier",) and qat.log_every_n_steps == 7
    assert qat.schedule(25) == 4  # the default anneal ends at 4 bits
    assert "qat" not in config("~callbacks.qat").callbacks
    low_bit = instantiate(config("callbacks.qat.bitwidth_overrides={net.features.0:8,net.classifier:8}",
                                 "callbacks.qat.activation_grid=auto", "callbacks.qat.interval=step",
                                 "callbacks.qat.bn_reestimate=true", "callbacks.qat.lr_rewarm_steps=20").callbacks.qat,
                          _convert_="all")
    assert low_bit.bitwidth_overrides == {"net.features.0": 8, "net.classifier": 8}
    assert (low_bit.activation_grid, low_bit.interval, low_bit.bn_reestimate, low_bit.lr_rewarm_steps) == ("auto", "step", True, 20)


def test_specs_compose_from_presets_and_single_fields():
    qat = instantiate(config("+quant=per_channel", "callbacks.qat.input.granularity=per_token",
                             "callbacks.qat.rules={net.classifier:{bits:8}}").callbacks.qat, _convert_="all")
    assert qat.weight_spec.granularity == "per_channel" and qat.input_spec.granularity == "per_token"
    assert qat.input_spec.grid == "auto" and qat.rules == {"net.classifier": {"bits": 8}}
    lsq = instantiate(config("+quant=lsq").callbacks.qat, _convert_="all")
    assert (lsq.weight_spec.quantizer, lsq.input_spec.quantizer) == ("lsq", "lsq")
    assert lsq.input_spec.option("init") == "minmax"
    # A shortcut given on the command line still wins over the spec's field (one release).
    legacy = instantiate(config("callbacks.qat.activation_grid=signed").callbacks.qat, _convert_="all")
    assert legacy.input_spec.grid == "signed"


def test_a_misspelled_key_is_one_line_and_exit_status_2(tmp_path):
    result = app("shedule=constant", f"hydra.run.dir={tmp_path}/a", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: unknown config key `shedule`: check its spelling (`python -m experiments.train --cfg job` prints the "
        "config), or add a new key with +shedule=..."]
    result = app("callbacks.qat.input.granularty=per_token", f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)
    assert result.returncode == 2 and "`callbacks.qat.input.granularty`" in result.stderr
    result = app("callbacks.qat.input.granularity=per_row", f"hydra.run.dir={tmp_path}/c", cwd=tmp_path)
    assert result.returncode == 2 and "`granularity` must be one of 'per_tensor', 'per_channel', 'per_token'" in \
        result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("option", ["tensorboard", "csv"])
def test_logger_options(option, tmp_path):
    logger = instantiate(config(f"logger={option}").logger, save_dir=str(tmp_path))
    assert type(logger).__name__ == {"tensorboard": "TensorBoardLogger", "csv": "CSVLogger"}[option]


def test_trainer_options():
    cpu = instantiate(config("trainer=cpu").trainer, enable_progress_bar=False, logger=False)
    assert cpu.max_epochs == 30 and cpu.num_devices == 1
    ddp_cpu = instantiate(config("trainer=ddp_cpu").trainer, enable_progress_bar=False, logger=False)
    assert ddp_cpu.num_devices == 2 and type(ddp_cpu.strategy).__name__ == "DDPStrategy"
    gpu, ddp = config("trainer=gpu").trainer, config("trainer=ddp").trainer
    assert (gpu.accelerator, gpu.devices) == ("gpu", 1)
    assert (ddp.accelerator, ddp.strategy, ddp.devices, ddp.sync_batchnorm) == ("gpu", "ddp", -1, True)


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("basic", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launcher_options_compose(launcher, target):
    assert config(f"hydra/launcher={launcher}", hydra=True).hydra.launcher._target_ == target


@pytest.mark.parametrize(
    "recipe, schedule, overrides, grid",
    [
        ("constant", "ConstantBitwidth", {}, "signed"),
        ("naive_anneal", "StepBitwidth", {}, "signed"),
        ("lowbit", "ConstantBitwidth", {"net.features.0": 8, "net.classifier": 8}, "auto"),
    ],
)
def test_recipes_compose(recipe, schedule, overrides, grid):
    qat = instantiate(config(f"+recipe={recipe}", "bits=3").callbacks.qat, _convert_="all")
    assert type(qat.schedule).__name__ == schedule and qat.schedule(29) == 3
    assert qat.bitwidth_overrides == overrides and qat.activation_grid == grid


def test_lowbit_experiment_preset_is_the_lowbit_recipe():
    preset, recipe = config("+experiment=lowbit", "bits=2"), config("+recipe=lowbit", "bits=2")
    assert OmegaConf.to_container(preset, resolve=True) == OmegaConf.to_container(recipe, resolve=True)
    rules = OmegaConf.to_container(preset.callbacks.qat.rules)
    assert rules == {"net.features.0": {"bits": 8}, "net.classifier": {"bits": 8}}


def test_fp32_recipe_and_results_preset(tmp_path):
    assert config("+recipe=fp32").callbacks.qat is None
    result = run(config(*FAST, "+recipe=fp32", "trainer.max_epochs=1"), tmp_path)
    assert result["bitwidth"] is None
    cfg = config("+experiment=lowbit_results", hydra=True)
    assert dict(cfg.hydra.sweeper.params) == {"+recipe": "fp32,constant,naive_anneal,lowbit", "bits": "2,3,4,8", "seed": "0,1,2"}


def test_bitwidth_sweep_preset():
    cfg = config("+experiment=bitwidth_sweep", hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"schedule": "constant,step", "bits": "2,3,4,8", "seed": "0,1,2"}


# ------------------------------------------------------------------------------ run
@pytest.fixture(scope="module")
def default_like_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, run(config(*FAST), out)


def test_pipeline_writes_metrics_checkpoints_and_tensorboard(default_like_run):
    out, result = default_like_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == result
    assert saved["status"] == "ok" and saved["bitwidth"] == 4 and saved["epochs"] == 3  # the schedule fits the run
    assert 0.5 < saved["test/acc"] <= 1.0 and 0.5 < saved["val/acc"] <= 1.0
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(not key.count("quantizer") for key in checkpoint["state_dict"])
    scalars = read_scalars(out / "tensorboard")
    for tag in ("train/loss", "val/loss", "val/acc", "test/acc", "test/loss", "quant/bitwidth",
                "quant/net.features.0/weight/sqnr_db", "quant/net.classifier/input/scale_factor"):
        assert tag in scalars, tag
    assert scalars["test/acc"][-1][1] == pytest.approx(saved["test/acc"], abs=1e-6)


def test_hparams_tab_holds_the_config_and_final_metrics(default_like_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, result = default_like_run
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["data/_target_"].string_value == "experiments.data.SyntheticDataModule"
    assert hparams["seed"].number_value == 0
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"final/test_acc", "final/val_acc"} <= metric_tags
    assert read_scalars(out / "tensorboard")["final/test_acc"][-1][1] == pytest.approx(result["test/acc"], abs=1e-6)


def test_same_seed_and_config_give_identical_metrics(tmp_path, default_like_run):
    out, _ = default_like_run
    run(config(*FAST), tmp_path)
    assert (tmp_path / "metrics.json").read_bytes() == (out / "metrics.json").read_bytes()


def test_fp32_baseline_and_excluded_layers(tmp_path):
    baseline = run(config(*FAST, "~callbacks.qat"), tmp_path / "fp32")
    assert baseline["bitwidth"] is None
    assert not any(tag.startswith("quant/") for tag in read_scalars(tmp_path / "fp32" / "tensorboard"))
    run(config(*FAST, "callbacks.qat.exclude=[net.classifier]", "schedule=constant"), tmp_path / "excl")
    tags = set(read_scalars(tmp_path / "excl" / "tensorboard"))
    assert "quant/net.features.0/weight/mse" in tags and not any("classifier" in t for t in tags)


def test_csv_logger_run(tmp_path):
    result = run(config(*FAST, "logger=csv", "trainer.max_epochs=1", "schedule=constant"), tmp_path)
    assert (tmp_path / "csv" / "metrics.csv").is_file() and result["status"] == "ok"


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["bits=40"], "ValueError", r"`bits` must be an int in 2\.\.32, got 40"),
        (["bits=1"], "ValueError", r"`bits` must be an int in 2\.\.32, got 1"),
        (["schedule=constant", "schedule.bits=1"], "InstantiationException", r"`bits` must be an int in 2\.\.32, got 1"),
        (["trainer.max_epochs=-3"], "ValueError", r"`trainer.max_epochs` must be an int >= 1, got -3"),
        (["schedule=linear", "schedule.start_epoch=-1"], "InstantiationException", r"`start_epoch` must be an int epoch >= 0, got -1"),
        (["schedule=cosine", "schedule.start_epoch=5", "schedule.end_epoch=2"], "InstantiationException", r"`end_epoch` \(2\) must be >= `start_epoch` \(5\)"),
        (["data=file"], "MissingMandatoryValue", r"data\.path"),
        (["data=file", "data.path=/no/such/file.npz"], "InstantiationException", r"`data.path` '/no/such/file.npz' does not exist"),
        (["data.batch_size=0"], "InstantiationException", r"`data.batch_size` must be an int >= 1, got 0"),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, overrides, error, message):
    with pytest.raises(Exception, match=message) as raised:
        run(config(*overrides), tmp_path)
    assert type(raised.value).__name__ == error
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoints").exists()


# -------------------------------------------------------------------------- the shell
def test_bad_configurations_from_the_shell_exit_non_zero_with_one_line(tmp_path):
    unknown = app("model=resnet", f"hydra.run.dir={tmp_path}/a", cwd=tmp_path)
    assert unknown.returncode != 0 and "Could not find 'model/resnet'" in unknown.stderr
    bad_bits = app("schedule=constant", "schedule.bits=64", f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)
    assert bad_bits.returncode == 2
    assert bad_bits.stderr.strip().splitlines()[-1] == (
        "Error: ValueError: `bits` must be an int in 2..32, got 64 (config key `callbacks.qat.schedule`)"
    )


def test_an_earlier_run_directory_is_never_overwritten(tmp_path):
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "metrics.json").write_text('{"test/acc": 0.5}\n')
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    result = app(*FAST, f"hydra.run.dir={earlier}", cwd=tmp_path)
    assert result.returncode == 2 and "already holds the results of an earlier run" in result.stderr
    assert (earlier / "metrics.json").read_text() == '{"test/acc": 0.5}\n'
    assert (earlier / "checkpoints" / "last.ckpt").read_bytes() == b"weights"


def test_multirun_sweep_writes_summary_and_keeps_rows_of_a_failed_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = app("-m", *FAST, "trainer.max_epochs=2", "schedule=constant", "schedule.bits=2,8,40",
                 f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    failed_dir = next(d.name for d in sweep_dir.iterdir() if "schedule.bits=40" in d.name)
    assert result.returncode == 1 and f"1 of 3 jobs failed (jobs {failed_dir})" in result.stderr
    import csv

    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [(r["status"], r["bitwidth"]) for r in rows] == [("ok", "2"), ("ok", "8"), ("failed", "")]  # job order
    for row in rows[:2]:
        assert "schedule.bits=" in row["job"]  # each job's dir is named after its overrides
        metrics = json.loads((sweep_dir / row["job"] / "metrics.json").read_text())
        assert float(row["test/acc"]) == pytest.approx(metrics["test/acc"])
    assert "got 40" in rows[2]["error"]
    markdown = (sweep_dir / "summary.md").read_text()
    assert "| failed |" in markdown and "| schedule.bits=8 | 8 | 1 |" in markdown
    png = (sweep_dir / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_ddp_cpu_trainer_runs_two_processes(tmp_path):
    result = app(*FAST, "trainer=ddp_cpu", "trainer.max_epochs=2", "schedule=linear", f"hydra.run.dir={tmp_path}/run",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "train_ddp_process_1.log").is_file()  # the second rank ran
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "ok"


# ------------------------------------------------------------------------- summary
def test_summary_mean_and_std_over_seeds(tmp_path):
    accuracies = {("constant", 0): 0.5, ("constant", 1): 0.7, ("step", 0): 0.9, ("step", 1): 0.8}
    for job, ((schedule, seed), acc) in enumerate(accuracies.items()):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(
            OmegaConf.to_yaml([f"schedule={schedule}", "bits=4", f"seed={seed}"]))
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps({"status": "ok", "test/acc": acc, "bitwidth": 4}))
    cells = {c["cell"]: c for c in aggregate(collect_jobs(tmp_path), "test/acc")}
    assert set(cells) == {"schedule=constant", "schedule=step"}
    assert cells["schedule=constant"]["mean"] == pytest.approx(0.6)
    assert cells["schedule=constant"]["std"] == pytest.approx(0.1414213562)
    assert cells["schedule=step"]["n"] == 2 and cells["schedule=step"]["mean"] == pytest.approx(0.85)
    write_summary(collect_jobs(tmp_path), tmp_path)
    markdown = (tmp_path / "summary.md").read_text()
    assert "| series | 4 bits |" in markdown
    assert "| schedule=constant | 60.00 ± 14.14 |" in markdown and "| schedule=step | 85.00 ± 7.07 |" in markdown
