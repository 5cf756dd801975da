"""Where streamchat keeps what it builds once per machine: converted models, packed weights, native kernels."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "STREAMCHAT_CACHE"


def cache_root() -> Path:
    """Where converted models are kept: $STREAMCHAT_CACHE, else ~/.cache/streamchat."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "streamchat").expanduser()
