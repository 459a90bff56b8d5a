"""Pictures: image grids and process strips (PIL), training curves and 2-D scatters (matplotlib, Agg)."""

from deepgm.viz.grids import image_grid, save_image_grid, save_strip
from deepgm.viz.plots import plot_curves, plot_metrics, read_metrics, scatter_2d

__all__ = ["image_grid", "plot_curves", "plot_metrics", "read_metrics", "save_image_grid", "save_strip",
           "scatter_2d"]
