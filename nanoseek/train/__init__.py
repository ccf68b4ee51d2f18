"""Training: one loop (loop.py) that every stage reuses; the pretraining command (pretrain.py)."""

from .loop import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
