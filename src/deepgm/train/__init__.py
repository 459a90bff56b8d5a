"""Training: the loop, its config, EMA and atomic safetensors checkpoints."""

from deepgm.train.checkpoint import (
    CheckpointError,
    damage,
    init_from,
    intact_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_state,
    load_weights,
    save_checkpoint,
    usable_checkpoint,
)
from deepgm.train.ema import EMA, ema_decay_at
from deepgm.train.trainer import BatchSampler, TrainConfig, Trainer, learning_rate

__all__ = ["EMA", "BatchSampler", "CheckpointError", "TrainConfig", "Trainer", "damage", "ema_decay_at",
           "init_from", "intact_checkpoint", "latest_checkpoint", "learning_rate", "load_checkpoint", "load_state",
           "load_weights", "save_checkpoint", "usable_checkpoint"]
