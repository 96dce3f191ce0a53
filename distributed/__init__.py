"""TARS Distributed: home PCs with mismatched NVIDIA GPUs acting as one local AI service."""

__version__ = "0.1.0"
