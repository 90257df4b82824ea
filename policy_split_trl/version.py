"""The package version, in a module of its own so that any module (and `setup.cfg`) can read it without importing
the package's `__init__` (and with it the trainers)."""

__version__ = "0.1.0.dev0"
