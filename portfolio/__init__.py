"""portfolio: a continual-learning LoRA adapter portfolio manager.

    from portfolio import Registry
    reg = Registry.open("sqlite:///registry.db", "store/")
"""

from portfolio.errors import PortfolioError
from portfolio.registry.registry import DataSpec, EvalSpec, ParentSpec, Registry

__version__ = "0.1.0"
__all__ = ["Registry", "PortfolioError", "DataSpec", "EvalSpec", "ParentSpec", "__version__"]
