"""tinytale: train a small GPT on fairy tales, with every run tracked in MLflow."""

__version__ = "0.1.0"
