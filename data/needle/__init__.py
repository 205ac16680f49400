"""The needle task: `from data.needle import make_needle` (defined, with the writer, in prepare.py)."""
from .prepare import make_needle  # noqa: F401
