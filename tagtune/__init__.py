"""tagtune: reproducible fine-tuning of small causal LMs on your own data."""

__version__ = "0.1.0"
