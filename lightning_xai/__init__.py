"""lightning_xai: explainable AI as part of PyTorch Lightning training."""

__version__ = "0.1.0"
