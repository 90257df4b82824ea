"""Dual-mode evaluation: the paper's measurements (Tables 1, 2, 5, 6, 7) for any model, both modes side by side."""

from .backends import SamplingConfig, TransformersBackend, make_backend
from .checks import EvalConfigError
from .harness import EvalConfig, GenerationsFileError, evaluate_modes
from .parser import EvalParser

__all__ = [
    "EvalConfig",
    "EvalConfigError",
    "EvalParser",
    "GenerationsFileError",
    "SamplingConfig",
    "TransformersBackend",
    "evaluate_modes",
    "make_backend",
]
