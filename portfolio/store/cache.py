"""Where a machine keeps derived data: ``PORTFOLIO_CACHE``, else ``$XDG_CACHE_HOME/portfolio``,
else ``~/.cache/portfolio``. Dequantised base models and the S3 store's blob cache and work
folders live here; everything under it can be deleted at any time."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``PORTFOLIO_CACHE``, else ``$XDG_CACHE_HOME/portfolio``, else ``~/.cache/portfolio``."""
    if os.environ.get("PORTFOLIO_CACHE"):
        return Path(os.environ["PORTFOLIO_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "portfolio"


def cache_limit_bytes() -> int:
    """The blob cache's budget: ``PORTFOLIO_CACHE_GB`` gigabytes (default 20)."""
    try:
        return int(float(os.environ.get("PORTFOLIO_CACHE_GB", "20")) * 1024**3)
    except ValueError:
        return 20 * 1024**3
