"""Unwritable run directories and full disks: one clear error before training where it can be known then, else
at the failing write, with the run left resumable (bit-identical to an uninterrupted one). The full disk is real: a
small tmpfs, mounted where the machine allows it (root in a container that permits mounts), else skipped."""

import os
import subprocess

import pytest

from deepgm.cli import main
from deepgm.train import Trainer
from test_trainer import make, same_weights, tiny, vectors

TINY = ["train.steps=2", "train.batch_size=8", "train.checkpoint_every=2", "train.sample_every=2",
        "model.net.channels=8", "model.schedule.T=20", "sample.steps=2"]


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'mount failed'}): a full disk "
                    "needs root in a container that allows mounts")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)  # lazy: a failed run may still hold a log file open


def test_an_unwritable_run_directory_is_one_clear_error_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["train", "demo-digits", *TINY, "--out", str(blocker / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cannot write to the run directory" in err and "choose another --out" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training_and_nothing_is_left(small_disk, capsys):
    assert main(["train", "demo-digits", *TINY, "--out", str(small_disk / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "MiB free; this run needs about" in err and err.count("\n") == 1
    assert not (small_disk / "run").exists()


def test_a_disk_that_fills_during_a_run_stops_it_at_the_failing_write_and_the_run_resumes_exactly(small_disk,
                                                                                                   tmp_path):
    straight = Trainer(make(), vectors(), tiny(), tmp_path / "straight", progress=False)
    straight.fit()
    filler = small_disk / "filler"

    def fill_the_disk(model, step):  # after the step-12 checkpoint: something else takes the rest of the disk
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
            except OSError:
                pass

    run = small_disk / "run"
    first = Trainer(make(), vectors(), tiny(sample_every=12), run, sample_fn=fill_the_disk, progress=False)
    with pytest.raises(OSError) as failure:
        first.fit()
    assert failure.value.errno == 28  # ENOSPC, at the first write after the disk filled (a log line)
    del first
    os.remove(filler)
    resumed = Trainer(make(seed=1), vectors(), tiny(), run, progress=False)
    assert resumed.resume() and resumed.step == 12  # the half-written step-24 checkpoint is never loaded
    resumed.fit()
    assert same_weights(resumed.model, straight.model) and same_weights(resumed.ema_model, straight.ema_model)
