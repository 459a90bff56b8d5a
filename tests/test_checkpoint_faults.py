"""Damaged, unfinished, too new and foreign checkpoints: one clear error naming the file, what is wrong and the fix,
and a resume that falls back to the newest intact checkpoint, bit-identical to an uninterrupted run."""

import json

import pytest
import torch
from torch import nn

from deepgm.train import CheckpointError, Trainer, damage, intact_checkpoint, load_checkpoint, load_state, load_weights
from test_trainer import make, same_weights, tiny, vectors


@pytest.fixture()
def run(tmp_path):
    """A run that saved checkpoints at steps 12 and 24 (checkpoint_every 12, the two newest kept)."""
    trainer = Trainer(make(), vectors(), tiny(), tmp_path / "run", progress=False)
    trainer.fit()
    return tmp_path / "run"


def _truncate(file, keep: float = 0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _garble(file):
    data = bytearray(file.read_bytes())
    data[:8] = b"\xff" * 8  # the header length: garbage, same size
    file.write_bytes(bytes(data))


def test_intact_checkpoints_record_their_files_and_pass(run):
    newest = run / "checkpoints" / "step-00000024"
    record = json.loads((newest / "trainer.json").read_text())
    assert record["format_version"] == 1 and set(record["files"]) == {"model.safetensors", "ema.safetensors",
                                                                       "trainer.safetensors"}
    assert damage(newest) is None and intact_checkpoint(run) == (newest, [])


@pytest.mark.parametrize("fault,expected", [
    (lambda d: _truncate(d / "ema.safetensors"), "ema.safetensors has"),
    (lambda d: _garble(d / "model.safetensors"), "model.safetensors does not match the SHA-256"),
    (lambda d: (d / "trainer.safetensors").unlink(), "trainer.safetensors is missing"),
    (lambda d: (d / "trainer.json").write_text('{"step": 24, "optim'), "trainer.json is not valid JSON"),
])
def test_a_damaged_checkpoint_is_named_and_the_intact_one_found(run, fault, expected):
    newest, older = run / "checkpoints" / "step-00000024", run / "checkpoints" / "step-00000012"
    fault(newest)
    assert expected in damage(newest)
    path, skipped = intact_checkpoint(run)
    assert path == older and [p for p, _ in skipped] == [newest]
    with pytest.raises(CheckpointError) as err:  # sampling does not silently fall back to older weights
        load_weights(run)
    message = str(err.value)
    assert str(newest) in message and expected in message and "step-00000012" in message and "--resume" in message


def test_a_checkpoint_from_a_newer_format_is_refused(run):
    newest = run / "checkpoints" / "step-00000024"
    record = json.loads((newest / "trainer.json").read_text())
    (newest / "trainer.json").write_text(json.dumps({**record, "format_version": 99}))
    assert "newer deepgm" in damage(newest) and "upgrade" in damage(newest)


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_matches_an_uninterrupted_run(run, tmp_path, capsys):
    straight = Trainer(make(), vectors(), tiny(), tmp_path / "straight", progress=False)
    straight.fit()
    _truncate(run / "checkpoints" / "step-00000024" / "model.safetensors")
    resumed = Trainer(make(seed=1), vectors(), tiny(), run, progress=False)
    assert resumed.resume() and resumed.step == 12
    printed = capsys.readouterr().out
    assert "step-00000024 is damaged" in printed and "resuming from step-00000012" in printed
    resumed.fit()
    assert same_weights(resumed.model, straight.model) and same_weights(resumed.ema_model, straight.ema_model)


def test_no_intact_checkpoint_left_is_one_clear_error(run):
    for step in ("00000012", "00000024"):
        _truncate(run / "checkpoints" / f"step-{step}" / "ema.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        Trainer(make(), vectors(), tiny(), run, progress=False).resume()


def test_another_models_weights_are_one_clear_error(run):
    other = make()
    other.net = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Linear(32, 4))  # other widths: other shapes
    with pytest.raises(CheckpointError, match="weights of another model.*of another shape"):
        load_state(other, run / "ema.safetensors", load_weights(run))
    unrelated = nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match="tensors missing.*unexpected"):
        load_state(unrelated, run / "ema.safetensors", load_weights(run))
    model = make()
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(run / "checkpoints" / "step-00000024", unrelated, unrelated,
                        torch.optim.Adam(unrelated.parameters()), {})
    load_state(model, run / "ema.safetensors", load_weights(run))  # the right model loads


def test_checkpoints_without_size_records_are_checked_against_their_own_headers(run):
    newest, older = run / "checkpoints" / "step-00000024", run / "checkpoints" / "step-00000012"
    for path in (newest, older):
        record = json.loads((path / "trainer.json").read_text())
        record.pop("files"), record.pop("format_version")  # as written before the records existed
        (path / "trainer.json").write_text(json.dumps(record))
        assert damage(path) is None
    _truncate(newest / "model.safetensors", keep=0.9)
    assert "model.safetensors has" in damage(newest) and "where its header needs" in damage(newest)
    _garble(older / "ema.safetensors")
    assert damage(older) == "ema.safetensors has no valid safetensors header (garbage or truncated)"
