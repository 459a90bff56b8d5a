"""Training: the loop, its config, EMA and atomic safetensors checkpoints."""

from deepgm.train.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint
from deepgm.train.ema import EMA, ema_decay_at
from deepgm.train.trainer import BatchSampler, TrainConfig, Trainer, learning_rate

__all__ = ["EMA", "BatchSampler", "TrainConfig", "Trainer", "ema_decay_at", "latest_checkpoint", "learning_rate",
           "load_checkpoint", "load_weights", "save_checkpoint"]
