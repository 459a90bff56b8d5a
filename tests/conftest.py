import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache: the feature network is trained once per session into a temp dir."""
    monkeypatch.setenv("DEEPGM_CACHE", str(tmp_path_factory.getbasetemp() / "deepgm-cache"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models in a module: one thread is as fast, and far faster on a busy machine (deepgm.cpu says why).
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
