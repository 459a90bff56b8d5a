"""Datasets: analytic toy mixtures, scikit-learn digits, and files from disk."""

from deepgm.data import digits, files, shapes, toy  # noqa: F401  (registers the loaders)
from deepgm.data.base import Dataset, available_datasets, load_dataset, register
from deepgm.data.toy import GaussianMixture, make_mixture

__all__ = ["Dataset", "GaussianMixture", "available_datasets", "load_dataset", "make_mixture", "register"]
