"""llmsched: LLM-serving schedulers, a fast serving simulator, and the field's metrics."""

__version__ = "0.1.0"
