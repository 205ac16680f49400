"""The MQAR task: `from data.mqar import make_mqar` (defined, with the writer, in prepare.py)."""
from .prepare import make_mqar  # noqa: F401
