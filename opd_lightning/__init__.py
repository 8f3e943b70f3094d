"""opd_lightning: multi-expert on-policy distillation with PyTorch Lightning."""

__version__ = "0.1.0"
