"""Result files are written whole: a failing writer leaves the old file and no temp file behind."""

import json

import numpy as np
import pytest
import torch

from deepgm.files import atomic_write, write_json, write_npz


def test_write_json_replaces_the_file(tmp_path):
    path = write_json(tmp_path / "eval.json", {"fid": 1.5})
    write_json(path, {"fid": 2.5})
    assert json.loads(path.read_text()) == {"fid": 2.5}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = write_json(tmp_path / "eval.json", {"fid": 1.5})

    def half_then_crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"fid": ')
        raise KeyboardInterrupt  # a kill mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"fid": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_write_npz_keeps_dotted_names_and_fails_whole(tmp_path):
    path = write_npz(tmp_path / "samples-w2.5-seed0.npz", {"x": np.arange(6.0)})
    assert path.name == "samples-w2.5-seed0.npz"  # np.savez given a name would have added .npz to the temp file
    with pytest.raises(TypeError):  # the second array cannot be pickled: the writer dies after writing the first
        write_npz(path, {"x": np.zeros(10_000), "bad": (i for i in range(3))})
    np.testing.assert_array_equal(np.load(path)["x"], np.arange(6.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_pictures_are_written_whole(tmp_path):
    import matplotlib.pyplot as plt

    from deepgm.viz import save_image_grid
    from deepgm.viz.plots import save_figure

    grid = save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "grid.png")
    assert grid.read_bytes().startswith(b"\x89PNG")
    figure = save_figure(plt.figure(), tmp_path / "plot.png")
    before = figure.read_bytes()
    fig = plt.figure()
    with pytest.raises(ValueError, match="not supported"):  # matplotlib has no such format: savefig fails
        save_figure(fig, figure.with_suffix(".nope"))
    assert not plt.fignum_exists(fig.number)  # closed even so
    assert figure.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "plot.png"]
