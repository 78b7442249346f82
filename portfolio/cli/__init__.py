"""The `portfolio` command line. Each command parses its arguments, makes one call into
the library and formats the result; errors are turned into one line in `PortfolioGroup`
(`_base.py`). Commands live in one module per area and register on the root group."""

from __future__ import annotations

from portfolio.cli._base import cli
from portfolio.cli import compose, events, governance, quality, registry, routes, scheduler, serve, store, suites, training, ui  # noqa: F401  (registers commands)

__all__ = ["cli", "main"]


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="portfolio")
