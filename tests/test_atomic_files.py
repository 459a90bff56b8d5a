"""Result files are written whole: a failing writer leaves the old file and no temp file behind."""

import json

import pytest

from deepgm.files import atomic_write, write_json


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
