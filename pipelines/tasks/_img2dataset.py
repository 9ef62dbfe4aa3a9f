"""img2dataset, imported without wandb.

img2dataset's logger imports wandb at module level; wandb makes two temporary folders when imported and removes
them only at a normal exit, so every killed process that imported img2dataset (a Ray worker when its cluster
stops, a driver stopped with SIGKILL) left two in /tmp. The download never turns img2dataset's wandb logging on
(`enable_wandb=False`), so img2dataset gets an empty stand-in module instead; a later `import wandb` elsewhere in
the process finds the real one. Every module of this project that imports img2dataset goes through here first.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def import_img2dataset() -> Any:
    """The img2dataset package, imported (once a process) with an empty `wandb` module in place of the real one,
    unless the process imported wandb already."""
    if "img2dataset" not in sys.modules and "wandb" not in sys.modules:
        stand_in = types.ModuleType("wandb", "not imported: img2dataset's wandb logging is never enabled here")
        sys.modules["wandb"] = stand_in
        try:
            import img2dataset  # noqa: F401
        finally:
            if sys.modules.get("wandb") is stand_in:
                del sys.modules["wandb"]
    import img2dataset

    return img2dataset
