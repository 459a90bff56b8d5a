"""Diffusion models: schedules, denoisers, losses and samplers."""

from deepgm.diffusion.denoiser import Denoiser, Prediction, Thresholded
from deepgm.diffusion.losses import simple_loss, vlb, vlb_loss
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.samplers import SampleOutput, available_samplers, sample
from deepgm.diffusion.schedules import DiscreteVP, Schedule, make_schedule

__all__ = ["Denoiser", "DiffusionModel", "DiscreteVP", "Prediction", "SampleOutput", "Schedule", "Thresholded",
           "available_samplers", "make_schedule", "sample", "simple_loss", "vlb", "vlb_loss"]
