"""Bad input, property-based (Hypothesis): sampling plans, train options, config overrides, CLI arguments, dataset
files and checkpoints drawn at random end in one clear error (a ValueError naming the field, or the CLI's usage
error, exit status 2) or succeed; never another exception, never a traceback. The number of cases each property
tries is its max_examples (README, "Reliability")."""

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepgm.cli import build_parser
from deepgm.config import load_config
from deepgm.data.files import DatasetFileError, read_idx
from deepgm.family import SamplingPlan
from deepgm.train import CheckpointError, TrainConfig, Trainer, usable_checkpoint
from test_trainer import make, tiny, vectors

numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.none(), st.booleans())


@settings(max_examples=400, deadline=None)
@given(steps=numbers, guidance=numbers, threshold=st.one_of(st.text(max_size=12), st.sampled_from(
    ["static", "dynamic", "dynamic:0.9", "dynamic:1.5", "dynamic:x", "none", "clip"])), augmentation=numbers)
def test_a_sampling_plan_is_valid_or_one_error_naming_its_field(steps, guidance, threshold, augmentation):
    try:
        plan = SamplingPlan("ddim", steps, guidance=guidance, threshold=threshold, augmentation=augmentation)
    except (ValueError, TypeError) as err:
        assert any(word in str(err) for word in ("steps", "guidance", "threshold", "augmentation")), str(err)
        return
    assert plan.steps >= 1 and math.isfinite(float(plan.guidance)) and float(plan.guidance) >= 0
    assert 0 <= float(plan.augmentation) <= 1


TRAIN_OPTIONS = ["steps", "batch_size", "lr", "warmup_steps", "ema_decay", "grad_clip", "amp", "lr_schedule",
                 "checkpoint_every", "no_such_option"]


@settings(max_examples=400, deadline=None)
@given(option=st.sampled_from(TRAIN_OPTIONS), value=numbers)
def test_a_train_option_is_coerced_or_one_error_naming_it(option, value):
    try:
        TrainConfig.from_dict({option: value})
    except ValueError as err:
        assert option in str(err), str(err)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(["train.steps", "model.net.channels", "data.size", "sample.guidance", "model.kind",
                            "eval.n_samples", "nosection.x", "model", "train..steps", "=3"]),
       value=st.text(max_size=10))
def test_a_config_override_is_applied_or_one_error(key, value):
    try:
        load_config("demo-digits", [f"{key}={value}"])
    except ValueError as err:
        assert str(err) and "\n" not in str(err).strip()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.lists(st.sampled_from(["--steps", "--n", "--guidance", "--threshold", "--augmentation", "--seed",
                                      "--sampler", "0", "-1", "nan", "inf", "3", "0.5", "ddim", "x", "--shard",
                                      "1/2", "2/1"]), max_size=6))
def test_sample_arguments_parse_or_are_a_usage_error(args):
    parser = build_parser()
    try:
        parser.parse_args(["sample", "runs/x", *args])
    except SystemExit as exit_:
        assert exit_.code == 2  # argparse's usage error: one line naming the argument


def _idx(shape, dtype_code=0x08, data=None) -> bytes:
    header = struct.pack(">HBB", 0, dtype_code, len(shape)) + b"".join(struct.pack(">I", d) for d in shape)
    return header + (data if data is not None else bytes(int(np.prod(shape))))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=64),
                         st.builds(lambda cut: _idx((3, 4, 4))[:cut], st.integers(0, 63)),
                         st.builds(lambda code: _idx((2, 2), code), st.integers(0, 255)),
                         st.builds(lambda dims: _idx(tuple(dims)), st.lists(st.integers(0, 5), max_size=4))),
       gzipped=st.booleans())
def test_a_damaged_idx_file_is_one_error_naming_it(tmp_path, content, gzipped):
    path = tmp_path / ("x.idx.gz" if gzipped else "x.idx")
    path.write_bytes(gzip.compress(content) if gzipped else content)
    try:
        read_idx(path)
    except DatasetFileError as err:
        assert path.name in str(err)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(make(), vectors(), tiny(steps=12, checkpoint_every=12), run, progress=False).fit()
    return run


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from(["model.safetensors", "ema.safetensors", "trainer.safetensors", "trainer.json"]),
       cut=st.floats(0, 0.999), garble=st.booleans(), offset=st.integers(0, 4096))
def test_a_damaged_checkpoint_is_one_checkpoint_error_naming_the_file(run, tmp_path, file, cut, garble, offset):
    import shutil
    import tempfile

    copy = Path(tempfile.mkdtemp(dir=tmp_path)) / "run"
    shutil.copytree(run, copy)
    target = copy / "checkpoints" / "step-00000012" / file
    data = bytearray(target.read_bytes())
    if garble:
        data[offset % len(data)] ^= 0xFF
    else:
        data = data[:int(cut * len(data))]
    target.write_bytes(bytes(data))
    try:
        usable_checkpoint(copy)
    except CheckpointError as err:
        assert file in str(err) or "trainer.json" in str(err), str(err)
    else:
        pytest.fail(f"{file} damaged ({'byte flipped' if garble else f'cut to {cut:.0%}'}) but accepted")
    finally:
        shutil.rmtree(copy)
