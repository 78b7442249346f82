"""``python -m portfolio``."""

from portfolio.cli import main

main()
