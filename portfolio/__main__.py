"""``python -m portfolio``."""

from portfolio.cli import main

if __name__ == "__main__":
    main()
