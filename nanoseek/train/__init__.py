"""Training: one loop (loop.py) that every stage reuses; the pretraining command (pretrain.py)."""

from .config import TrainConfig
from .loop import Trainer

__all__ = ["TrainConfig", "Trainer"]
