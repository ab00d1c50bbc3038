"""What the app prints: its own lines, not third-party deprecation noise and tips.

Filtered here, in the app, not in the library: a user of torchapprox or of the callback in
their own program keeps every warning their libraries give.
"""

from __future__ import annotations

import logging
import warnings

# Warnings raised inside Lightning, torch or Hydra about their own use of each other's APIs,
# which a user of this app can do nothing about.
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning on torch's pytree API
    r".*treespec, LeafSpec.*",
    r"The '(train|val|test)_dataloader' does not have many workers.*",
    r".*does not have many workers which may be a bottleneck.*",
    r"`torch.jit.script_method` is deprecated.*",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith("\N{ELECTRIC LIGHT BULB}")


def quiet_third_party() -> None:
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
