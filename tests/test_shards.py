"""Large sampling jobs streamed in shards: any split over processes and any kill give the files of one
uninterrupted process, and a folder never mixes two jobs."""

import json

import numpy as np
import pytest

from deepgm.cli import main
from deepgm.pipeline import draw, load_run, plan_for
from deepgm.shards import parse_shard, sample_shards

TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
        "train.sample_every=2", "model.net.channels=8", "model.schedule.T=20", "sample.steps=2"]
N = 300  # five shards of 64: the last one short


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("shards") / "run"
    assert main(["train", "demo-digits", *TINY, "--out", str(run), "--quiet"]) == 0
    return run


def _files(out):
    return np.load(out / "samples.npy"), dict(np.load(out / "cond.npz"))


def test_shards_in_any_order_and_split_give_the_samples_of_one_process(run, tmp_path, capsys):
    one = tmp_path / "one"
    assert main(["sample", str(run), "--n", str(N), "--shard-size", "64", "--out", str(one), "--quiet"]) == 0
    assert "5 shard(s) made now, 0 already there, of 5" in capsys.readouterr().out
    x, cond = _files(one)
    # the samples are exactly those of an ordinary draw: sample i depends on (seed, i) only
    loaded = load_run(run)
    reference = draw(loaded, N, 0, plan_for(loaded))
    assert np.array_equal(x, reference.x.numpy()) and np.array_equal(cond["cond_y"], reference.cond["y"].numpy())
    assert (one / "grid.png").is_file()
    # three processes, the last one started first: the last to finish merges, into the same bytes
    split = tmp_path / "split"
    for k in (3, 1):
        assert main(["sample", str(run), "--n", str(N), "--shard-size", "64", "--shard", f"{k}/3", "--out",
                     str(split), "--quiet"]) == 0
        assert "waiting for the other --shard processes" in capsys.readouterr().out
    assert main(["sample", str(run), "--n", str(N), "--shard-size", "64", "--shard", "2/3", "--out", str(split),
                 "--quiet"]) == 0
    assert "merged into" in capsys.readouterr().out
    assert (split / "samples.npy").read_bytes() == (one / "samples.npy").read_bytes()
    assert np.array_equal(_files(split)[1]["cond_y"], cond["cond_y"])


def test_a_killed_job_resumes_without_redoing_its_shards(run, tmp_path):
    out = tmp_path / "job"
    first = sample_shards(run, N, out=out, shard_size=64, progress=False)
    made = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    # a kill: two shards lost, and a temp file half-written by the killed process
    (out / "shards" / "shard-000001.npz").unlink()
    (out / "shards" / "shard-000004.npz").unlink()
    (out / "samples.npy").unlink()
    (out / "shards" / "shard-000004.npz.abc.tmp").write_bytes(b"half")
    again = sample_shards(run, N, out=out, shard_size=64, progress=False)
    assert again.made == [1, 4] and again.already == 3 and first.made == [0, 1, 2, 3, 4]
    for name, mtime in made.items():
        if name not in ("shard-000001.npz", "shard-000004.npz"):
            assert (out / "shards" / name).stat().st_mtime_ns == mtime  # not redone
    assert np.array_equal(np.load(again.merged), _files(out)[0])


def test_a_folder_holds_one_job_and_bad_shard_arguments_are_one_clear_error(run, tmp_path, capsys):
    out = tmp_path / "job"
    sample_shards(run, 128, out=out, shard_size=64, progress=False)
    job = json.loads((out / "job.json").read_text())
    assert job["n"] == 128 and job["plan"]["sampler"] == "ddim"
    assert main(["sample", str(run), "--n", "128", "--seed", "1", "--shard-size", "64", "--out", str(out)]) == 2
    assert "holds another sampling job (it differs in seed)" in capsys.readouterr().err
    for bad in ("0/3", "4/3", "a/b", "3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    assert main(["sample", str(run), "--n", "128", "--shard-size", "100", "--out", str(tmp_path / "b")]) == 2
    assert "multiple of 64" in capsys.readouterr().err
