"""Peer libraries for side-by-side checks (the `bench` extra): k-diffusion's sampling module without its package.

k-diffusion's package __init__ imports its training code, which needs torchvision (which does not install beside
the CPU torch this project pins). Its sampling.py and the utils.py it imports use torchvision for two image
helpers only, so they are loaded from the installed files, with empty placeholder modules for torchvision if it
is absent. Install: pip install -e '.[bench]' && pip install --no-deps k-diffusion.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

K_DIFFUSION_MISSING = ("k-diffusion is not installed; for the peer comparisons run "
                       "pip install -e '.[bench]' && pip install --no-deps k-diffusion")


def load_k_diffusion_sampling():
    """k_diffusion/sampling.py (and the utils.py it imports), without the package __init__."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(K_DIFFUSION_MISSING)
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    root = pathlib.Path(spec.submodule_search_locations[0])
    placeholders = []
    if importlib.util.find_spec("torchvision") is None:  # utils.py imports it for two image helpers only
        placeholders = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
        sys.modules.update({name: types.ModuleType(name) for name in placeholders})
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    sys.modules["k_diffusion"] = package
    try:
        for sub in ("utils", "sampling"):
            sub_spec = importlib.util.spec_from_file_location(f"k_diffusion.{sub}", root / f"{sub}.py")
            module = importlib.util.module_from_spec(sub_spec)
            sys.modules[f"k_diffusion.{sub}"] = module
            sub_spec.loader.exec_module(module)
            setattr(package, sub, module)
    finally:
        for name in placeholders:  # gone again, so that other libraries' torchvision checks see the truth
            del sys.modules[name]
    return package.sampling
