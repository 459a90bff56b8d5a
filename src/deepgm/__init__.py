"""deepgm: deep generative models — VAEs, diffusion and score SDEs — correct, fast and readable."""

from deepgm.data import Dataset, load_dataset, make_mixture
from deepgm.diffusion import Denoiser, DiffusionModel, Guided, Thresholded, make_schedule, sample
from deepgm.family import SamplingPlan

__version__ = "0.1.0"

__all__ = ["Dataset", "Denoiser", "DiffusionModel", "Guided", "SamplingPlan", "Thresholded", "load_dataset",
           "make_mixture", "make_schedule", "sample"]
