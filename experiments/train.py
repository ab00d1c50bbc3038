"""The Hydra app: one QAT run, or a sweep of them with `-m`.

    python -m experiments.train                                        # default: CNN on digits, 16 -> 8 -> 4 bits
    python -m experiments.train -m schedule=constant bits=2,3,4,8       # a bitwidth sweep
    python -m experiments.train '~callbacks.qat'                       # the fp32 baseline
    python -m experiments.train ckpt_path=outputs/<run>/checkpoints/last.ckpt   # resume a run

Writes into the Hydra run dir: tensorboard/ (events, hparams), checkpoints/ (last.ckpt at
the end of every epoch, and the best by val/acc) and metrics.json (final validation and
test metrics). A bad configuration stops before training with a one-line message and exit
status 2; SIGTERM and SIGINT stop with status 143 and 130 and leave interrupted.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

import torchapprox as ta
from callbacks import QuantizationAwareTraining
from callbacks.schedules import epoch_at
from experiments import run_dir as run_dirs
from experiments.checkpoint_io import AtomicCheckpointIO
from experiments.command_line import check_or_exit
from experiments.console import quiet_third_party
from experiments.run_dir import FAILURE_FILE, INTERRUPTED_FILE, METRICS_FILE

log = logging.getLogger(__name__)

# Resolvers the configs use: schedules as fractions of the run, the run dir's protection.
OmegaConf.register_new_resolver("epoch_at", epoch_at, replace=True)
OmegaConf.register_new_resolver("run_config_subdir", run_dirs.config_subdir, replace=True)
OmegaConf.register_new_resolver("job_dir_name", run_dirs.job_dir_name, replace=True)

# What Lightning's DDP launcher sets in the launching process (lightning.fabric ...
# subprocess_script.py); a later DDP job in the same sweep process must start without it.
DDP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
TOP_LEVEL_KEYS = ("data", "model", "schedule", "trainer", "logger", "callbacks", "seed", "bits", "threads", "ckpt_path")
CONFIG_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, InstantiationException,
                 OmegaConfBaseException)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, so that nothing between the signal and
    the app takes it for an ordinary error (Lightning tears down and re-raises it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.epoch: int | None = None

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class RunDirUnavailable(Exception):
    """The run dir holds a finished run, or another run is using it."""


class Diverged(RuntimeError):
    """A final metric is not finite: the run failed (metrics.json never holds a NaN)."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _interrupt)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    install_signal_handlers()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        metrics = run(cfg, output_dir, in_sweep=in_sweep)
    except Interrupted as interrupted:
        record_interruption(output_dir, interrupted)
        raise  # through Hydra, to `entry`, which ends the process (after a sweep's summary)
    except Exception as error:
        message = describe(error)
        if in_sweep:  # record the failure, let the other jobs run; the summary lists it
            log.error("job failed: %s", message)
            if not isinstance(error, RunDirUnavailable):  # not ours to write into
                write_json(output_dir / FAILURE_FILE, {"status": "failed", "error": message})
            return None
        if isinstance(error, (*CONFIG_ERRORS, RunDirUnavailable)):
            print(f"Error: {message}", file=sys.stderr)
            sys.exit(2)
        if isinstance(error, Diverged):
            write_json(output_dir / FAILURE_FILE, {"status": "failed", "error": message})
            print(f"Error: {message}", file=sys.stderr)
            sys.exit(1)
        raise
    return metrics.get("test/acc")


def run(cfg: DictConfig, output_dir: Path, in_sweep: bool = False) -> dict[str, Any]:
    """Train, validate and test as ``cfg`` says, writing everything under ``output_dir``."""
    check_config(cfg)
    primary = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    if primary:
        existing = read_finished(output_dir)
        if existing is not None and in_sweep:  # a sweep re-run: this job is done, keep it
            log.info("%s already holds this job's results: skipped", output_dir)
            return existing
        if existing is not None:
            raise RunDirUnavailable(f"{output_dir} already holds the results of an earlier run ({METRICS_FILE}); "
                                    "choose another hydra.run.dir rather than overwrite them")
        if not run_dirs.claim(output_dir):
            raise RunDirUnavailable(f"another run (pid {run_dirs.holder(output_dir)}) is using {output_dir}; "
                                    "choose another hydra.run.dir")
        (output_dir / INTERRUPTED_FILE).unlink(missing_ok=True)  # this attempt replaces an interrupted one
    threads = torch.get_num_threads()
    environment = {key: os.environ.get(key) for key in DDP_ENVIRONMENT}
    torch.set_num_threads(cfg.threads)  # the results depend on it: pinned, and recorded
    try:
        return _train(cfg, output_dir, in_sweep)
    finally:
        torch.set_num_threads(threads)  # run() may be called in a process that goes on
        if primary and torch.distributed.is_available() and torch.distributed.is_initialized():
            # A sweep's next DDP job starts its own group, and its own other ranks: this job's
            # group and the variables Lightning's launcher set for it must not outlive it.
            torch.distributed.destroy_process_group()
        if primary:
            for key, value in environment.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _train(cfg: DictConfig, output_dir: Path, in_sweep: bool) -> dict[str, Any]:
    seed_everything(cfg.seed, workers=True, verbose=False)
    if in_sweep:
        _single_run_argv_for_ddp_ranks(output_dir)

    # Build everything before training starts, so that a bad value fails at once.
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks = build_callbacks(cfg.get("callbacks") or {}, output_dir)
    logger = instantiate(cfg.logger, save_dir=str(output_dir)) if cfg.get("logger") else False
    trainer: Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir),
        plugins=[AtomicCheckpointIO()], _convert_="all",
    )
    ckpt_path = cfg.get("ckpt_path")
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        if trainer.interrupted:  # Lightning's own SIGTERM path ends fit without an error
            raise Interrupted(signal.SIGTERM)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        metrics.update(test_metrics(trainer, model, datamodule))
        metrics.update(precision_metrics(model, datamodule))
    except Interrupted as interrupted:
        interrupted.epoch = trainer.current_epoch
        raise
    if not trainer.is_global_zero:
        return {}
    qat = next((c for c in callbacks if isinstance(c, QuantizationAwareTraining)), None)
    result = {
        "status": "ok",
        **{k: round(float(v), 6) for k, v in sorted(metrics.items())},
        "bitwidth": qat.bitwidth if qat else None,  # None: the fp32 baseline
        "epochs": trainer.current_epoch,
        "seed": cfg.seed,
        "threads": cfg.threads,
        "torch": torch.__version__,
    }
    diverged = [k for k, v in metrics.items() if not math.isfinite(v)]
    if diverged:
        raise Diverged(f"training diverged: {', '.join(f'{k} = {metrics[k]}' for k in diverged)} "
                       "(lower the learning rate or raise the bitwidth)")
    print(f"metrics: {json.dumps(result)}", flush=True)  # printed first: a failed write loses nothing
    write_json(output_dir / METRICS_FILE, result)
    log_hyperparameters(trainer, cfg, result)
    print(f"results: {output_dir} ({METRICS_FILE}, checkpoints/)"
          + (f"; view them with: tensorboard --logdir {output_dir}" if logger else ""), flush=True)
    return result


def precision_metrics(model, datamodule) -> dict[str, float]:
    """``precision/{average_bits, size_bytes, bit_operations}`` of a quantized model at its
    final bits (``ta.precision_summary`` on a test batch); nothing for the fp32 baseline."""
    if not ta.quantized_layers(model):
        return {}
    batch = next(iter(datamodule.test_dataloader()))
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    summary = ta.precision_summary(model, x.to(model.device))
    return {f"precision/{key}": float(value) for key, value in summary.items() if value is not None}


def test_metrics(trainer: Trainer, model, datamodule) -> dict[str, float]:
    """The final model's test metrics (the final bitwidth, not an earlier "best" checkpoint,
    which during an anneal may come from a wider bitwidth than the run is about).

    Across several processes a distributed sampler pads the test set to a multiple of
    their number, counting some samples twice: rank zero then tests the whole set alone.
    """
    if trainer.world_size == 1:
        return trainer.test(model, datamodule=datamodule, verbose=trainer.is_global_zero)[0]
    if not trainer.is_global_zero:
        return {}
    return model.evaluate(datamodule.test_dataloader(), "test")


def _single_run_argv_for_ddp_ranks(output_dir: Path) -> None:
    """Lightning starts the other DDP ranks by running this script again with its command
    line plus ``hydra.run.dir``. In a sweep that command line is the whole sweep: make it
    this job's, and the run dir this job's dir, so each rank runs this one job."""
    overrides = list(HydraConfig.get().overrides.task)
    sys.argv = [sys.argv[0], *overrides]
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = str(output_dir)


def check_config(cfg: DictConfig) -> None:
    """Checks instantiate cannot make: unknown top-level keys (``+ckpt_path=...`` would pass
    in silence), and values Lightning would read otherwise (max_epochs=-1 is 'forever')."""
    unknown = [key for key in cfg if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise KeyError(f"unknown top-level config key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                       f"the keys are: {', '.join(TOP_LEVEL_KEYS)}")
    bits = cfg.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
        # Checked here, so that the message names `bits` rather than a schedule field it fills.
        raise ValueError(f"`bits` must be an int in 2..32, got {bits!r}")
    max_epochs = cfg.trainer.get("max_epochs")
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"`trainer.max_epochs` must be an int >= 1, got {max_epochs!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {cfg.seed!r}")
    threads = cfg.get("threads")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be an int >= 1, got {threads!r}")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(str(ckpt_path)).is_file():
        raise FileNotFoundError(f"`ckpt_path` {str(ckpt_path)!r} is not a checkpoint file")


def read_finished(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "ok"}


def record_interruption(output_dir: Path, interrupted: Interrupted) -> None:
    name = signal.Signals(interrupted.signum).name
    epoch = interrupted.epoch
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        write_json(output_dir / INTERRUPTED_FILE, {
            "status": "interrupted", "signal": name, "epoch": epoch,
            "last_checkpoint": str(checkpoint) if checkpoint.is_file() else None,
        })
    resume = f"; resume with: python -m experiments.train ckpt_path={checkpoint}" if checkpoint.is_file() else ""
    print(f"Interrupted by {name} during epoch {epoch}: {output_dir / INTERRUPTED_FILE}{resume}", file=sys.stderr,
          flush=True)


def build_callbacks(callbacks_cfg: DictConfig, output_dir: Path) -> list:
    callbacks = []
    for entry in callbacks_cfg.values():
        if entry is None:
            continue
        overrides = {}
        if str(entry.get("_target_", "")).endswith("ModelCheckpoint") and entry.get("dirpath") is None:
            overrides["dirpath"] = str(output_dir / "checkpoints")
        callbacks.append(instantiate(entry, _convert_="all", **overrides))
    return callbacks


def log_hyperparameters(trainer: Trainer, cfg: DictConfig, result: dict[str, Any]) -> None:
    """The whole config and the final metrics into the hparams tab (and hparams.yaml)."""
    params = OmegaConf.to_container(cfg, resolve=True)
    final = {f"final/{k.replace('/', '_')}": v for k, v in result.items() if isinstance(v, float)}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=final)
        else:
            logger.log_hyperparams(params)
        logger.save()


def describe(error: BaseException) -> str:
    """A one-line message: for instantiate errors, the underlying error and its config key."""
    text = str(error).strip()
    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        key = text.rsplit("full_key:", 1)[-1].strip() if "full_key:" in text else ""
        return describe(error.__cause__) + (f" (config key `{key}`)" if key else "")
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file, and a failed write (a full disk) leaves
    no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def entry() -> None:
    """The command: a run or a sweep, ending with 128 + the signal's number when interrupted
    (after writing the summary of a sweep's finished jobs)."""
    install_signal_handlers()
    check_or_exit(sys.argv[1:])  # a misspelled key: one line and exit 2, before Hydra's advice
    try:
        main()
    except Interrupted as interrupted:
        from experiments.sweep_summary import summarize_current_sweep

        summarize_current_sweep()
        sys.exit(interrupted.exit_status)


if __name__ == "__main__":
    entry()
