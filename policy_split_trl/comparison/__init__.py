"""Method comparison (the paper's Table 1 for any list of methods): [`CompareConfig`] says which methods, trained with
which recipe and budget, evaluated how; [`compare`] trains and evaluates each (resuming what is done) and writes one
table, one JSON and one plot. `policy-split-compare` is its command line."""

from .config import CompareConfig, CompareConfigError, CompareParser, load_compare_config
from .runner import MethodFailedError, compare

__all__ = [
    "CompareConfig",
    "CompareConfigError",
    "CompareParser",
    "MethodFailedError",
    "compare",
    "load_compare_config",
]
