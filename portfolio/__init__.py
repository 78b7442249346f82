"""portfolio: a continual-learning LoRA adapter portfolio manager.

    from portfolio import Registry, train_adapter, TrainConfig, merge_adapters, MergeRecipe
    reg = Registry.open("sqlite:///registry.db", "store/")

The names that need torch (training, evaluation, merging, serving) are imported on first
use, so `import portfolio` and the CLI start fast.
"""

from importlib import import_module
from typing import Any

from portfolio.errors import PortfolioError
from portfolio.registry.registry import DataSpec, EvalSpec, ParentSpec, Registry

__version__ = "0.1.0"

_LAZY = {
    "TrainConfig": "portfolio.training.config",
    "train_adapter": "portfolio.training.train",
    "evaluate": "portfolio.evaluation.evaluate",
    "promote": "portfolio.evaluation.promote",
    "revalidate": "portfolio.evaluation.promote",
    "MergeRecipe": "portfolio.compose.merge",
    "merge_adapters": "portfolio.compose.merge",
    "stack_adapters": "portfolio.compose.stack",
    "generate": "portfolio.serving",
    "export_version": "portfolio.export",
}

__all__ = ["Registry", "PortfolioError", "DataSpec", "EvalSpec", "ParentSpec", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'portfolio' has no attribute {name!r}")
