"""Training sparse coders: config, loop, losses, dead-feature handling, checkpoints."""

from .config import TrainConfig
from .loop import CoderSpec, Trainer

__all__ = ["CoderSpec", "TrainConfig", "Trainer"]
