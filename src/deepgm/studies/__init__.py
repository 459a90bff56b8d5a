"""Studies sit above the run layer: they train, load and compare runs of any family."""
