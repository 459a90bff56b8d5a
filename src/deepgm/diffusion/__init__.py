"""Diffusion models: schedules, denoisers, losses and samplers."""

from deepgm.diffusion.denoiser import Denoiser, Guided, Prediction, Thresholded
from deepgm.diffusion.losses import simple_loss, vlb, vlb_loss
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.sampling import SampleOutput, available_samplers, sample
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.diffusion.schedules import DiscreteVP, Schedule

__all__ = ["Denoiser", "DiffusionModel", "DiscreteVP", "Guided", "Prediction", "SampleOutput", "Schedule",
           "Thresholded", "available_samplers", "make_schedule", "sample", "simple_loss", "vlb", "vlb_loss"]
