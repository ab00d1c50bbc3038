"""The Hydra app: one QAT run, or a sweep of them with `-m`.

    python -m experiments.train                                        # default: CNN on digits, 16 -> 8 -> 4 bits
    python -m experiments.train -m schedule=constant bits=2,3,4,8       # a bitwidth sweep
    python -m experiments.train '~callbacks.qat'                       # the fp32 baseline

Writes into the Hydra run dir: tensorboard/ (events, hparams), checkpoints/ and metrics.json
(final validation and test metrics). A bad configuration stops before training with a
one-line message and exit status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from callbacks import QuantizationAwareTraining

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
FAILURE_FILE = "failed.json"
CONFIG_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, InstantiationException, OmegaConfBaseException)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        metrics = run(cfg, output_dir)
    except Exception as error:
        message = describe(error)
        if in_sweep:  # record the failure, let the other jobs run; the summary lists it
            log.exception("job failed: %s", message)
            write_json(output_dir / FAILURE_FILE, {"status": "failed", "error": message})
            return None
        if isinstance(error, CONFIG_ERRORS):
            print(f"Error: {message}", file=sys.stderr)
            sys.exit(2)
        raise
    return metrics.get("test/acc")


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Train, validate and test as ``cfg`` says, writing everything under ``output_dir``."""
    check_config(cfg)
    if (output_dir / METRICS_FILE).exists():
        raise FileExistsError(
            f"{output_dir} already holds the results of an earlier run ({METRICS_FILE}); "
            "choose another hydra.run.dir rather than overwrite them"
        )
    seed_everything(cfg.seed, workers=True, verbose=False)

    # Build everything before training starts, so that a bad value fails at once.
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks = build_callbacks(cfg.get("callbacks") or {}, output_dir)
    logger = instantiate(cfg.logger, save_dir=str(output_dir)) if cfg.get("logger") else False
    trainer: Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir), _convert_="all"
    )

    trainer.fit(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    # Test the final model (the final bitwidth), not an earlier "best" checkpoint, which
    # during an anneal may come from a wider bitwidth than the run is about.
    metrics.update(trainer.test(model, datamodule=datamodule, verbose=trainer.is_global_zero)[0])
    qat = next((c for c in callbacks if isinstance(c, QuantizationAwareTraining)), None)
    result = {
        "status": "ok",
        **{k: round(float(v), 6) for k, v in sorted(metrics.items())},
        "bitwidth": qat.bitwidth if qat else None,  # None: the fp32 baseline
        "epochs": trainer.current_epoch,
        "seed": cfg.seed,
    }
    if trainer.is_global_zero:
        write_json(output_dir / METRICS_FILE, result)
        log_hyperparameters(trainer, cfg, result)
        log.info("metrics: %s", json.dumps(result))
    return result


def check_config(cfg: DictConfig) -> None:
    """Checks instantiate cannot make: Lightning reads max_epochs=-1 as 'forever'."""
    max_epochs = cfg.trainer.get("max_epochs")
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"`trainer.max_epochs` must be an int >= 1, got {max_epochs!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"`seed` must be an int >= 0, got {cfg.seed!r}")


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
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)  # atomic: a reader never sees half a file


if __name__ == "__main__":
    main()
