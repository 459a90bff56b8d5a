"""Schedules by name: the discrete VP schedules of deepgm.diffusion.schedules and the continuous-time ones of
deepgm.diffusion.sde (a module of its own because it sits above both)."""

from deepgm.diffusion import sde
from deepgm.diffusion.schedules import DiscreteVP, Schedule

SCHEDULES = {"linear": DiscreteVP.linear, "cosine": DiscreteVP.cosine, "vp": sde.VPSDE, "subvp": sde.SubVPSDE,
             "ve": sde.VESDE, "edm": sde.EDMSchedule, "cosine-vp": sde.CosineVP, "learned": sde.LearnedSchedule}


def make_schedule(name: str, **options) -> Schedule:
    """A schedule by name, e.g. make_schedule('cosine', T=1000)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[name](**options)
    except TypeError as err:
        raise ValueError(f"bad options for schedule {name!r}: {err}") from None
