"""Check the command line's overrides before Hydra runs: a typo in a key or a group option
stops with one line and exit status 2 (Hydra itself prints several lines of advice and
exits 1)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
# Flags after which the next argument is the flag's value; with any of them (another
# config, or Hydra's own help), the check steps aside and Hydra decides.
_STEP_ASIDE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--help", "-h", "--hydra-help",
               "--info", "-i", "--run", "-r", "--shell-completion", "-sc"}


def problem_with(arguments: list[str]) -> str | None:
    """One line saying what is wrong with the overrides among ``arguments``, or None."""
    if any(argument in _STEP_ASIDE or argument.split("=")[0] in _STEP_ASIDE for argument in arguments):
        return None
    overrides, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument in ("--cfg", "-c", "--package", "-p"):
            skip = True  # these take a value
        elif not argument.startswith("-"):
            overrides.append(argument)
    if not overrides:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        # A sweep is checked with its first value: the keys are what can be misspelled.
        single = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
                  else o.input_line for o in parsed]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose("train", overrides=single, return_hydra_config=True)
    except Exception as error:  # noqa: BLE001 - every composition error gets the same one-line answer
        return _one_line(error)
    finally:
        GlobalHydra.instance().clear()
    return None


def _one_line(error: Exception) -> str:
    text = str(error).strip()
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown:
        # The key that is missing (a dict value's own key, for `options={init:mse}`).
        key = getattr(error.__cause__, "full_key", None) or unknown.group(1)
        return (f"unknown config key `{key}`: check its spelling (`python -m experiments.train --cfg job` prints the "
                f"config), or add a new key with +{key}=...")
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.MULTILINE)
        listed = f" (the options: {', '.join(options)})" if options else ""
        return f"Could not find '{missing.group(1)}'{listed}"
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first}"


def check_or_exit(arguments: list[str]) -> None:
    """Exit with status 2 and one line on stderr when the overrides are wrong."""
    problem = problem_with(arguments)
    if problem is not None:
        print(f"Error: {problem}", file=sys.stderr)
        sys.exit(2)
