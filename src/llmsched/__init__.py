"""llmsched: LLM-serving schedulers, a fast serving simulator, and the field's metrics."""

# First: the compiled core is used only while it matches its sources (llmsched/native.py).
from llmsched import native  # noqa: F401

__version__ = "0.1.0"
