"""Bad input through a real trained run (issue 17, "Hardening"), property-based (Hypothesis): `deepgm sample` with
random sampler arguments, `deepgm.sample` and the model's generate with mismatched shapes and labels, captions for a
model without text. Each case succeeds (files written) or ends in one clear error naming what is wrong (the CLI:
exit status 2 or 1, one error line on stderr, after argparse's usage text for usage errors; Python: a ValueError);
never a traceback, and a failed case leaves the run directory exactly as it was (files, sizes, modification times).
The number of cases each property tries is its max_examples."""

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import deepgm
from deepgm.cli import main
from deepgm.family import MAX_STEPS, SamplingPlan
from deepgm.pipeline import draw, generate_run, load_run

TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
        "train.sample_every=0", "model.net.channels=8", "model.schedule.T=20", "sample.steps=2"]
T = 20  # the tiny run's discrete steps: ddim and ddpm refuse more
SHAPE = (1, 8, 8)  # the digits at data.size 8
CLASSES = 10  # label 10 is the "no label" token of guidance

# tries per property (README, "Reliability")
SAMPLE_CASES, API_CASES, MODEL_CASES, CAPTION_CASES = 100, 150, 100, 30
ONE_RUN = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_tiny(folder: Path, extra: tuple[str, ...] = ()) -> Path:
    """A tiny demo-digits run (2 steps, 8 channels, T = 20) in folder/run, with `extra` overrides."""
    run = folder / "run"
    assert main(["train", "demo-digits", *TINY, *extra, "--out", str(run), "--quiet"]) == 0
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("trained"))


def listing(folder: Path) -> dict:
    """Every file under folder with its size and modification time: what "unchanged" means."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, args: list[str]) -> tuple[int, str, str]:
    """main(args) in this process: (exit status, stdout, stderr); argparse's usage errors exit with status 2."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(command: str, err: str) -> str:
    """The one error line of a failed command: last on stderr; anything before it is argparse's usage text."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"deepgm {command}: error: "), err
    assert all(line.startswith("usage:") or line.startswith(" ") for line in lines[:-1]), err
    return lines[-1]


# --- 1a. deepgm sample RUN with random sampler arguments ----------------------------------------------------------

# the ODE samplers are cheap here but for rk45 (adaptive, seconds) and the calibrating ones (auto, trig-abm: a pilot
# of seconds each time a run is loaded); those two come with a fixed --grid, which auto refuses and trig-abm takes
CHEAP = ["ddim", "ddpm", "deis", "dpmpp-2m", "dpmpp-2m-sde", "dpmpp-3m", "dpmpp-3m-sde", "euler",
         "euler-ancestral", "euler-maruyama", "heun", "lms", "pc", "unipc"]
NOT_WHOLE = ["x", "", "2.5", "1e3", "nan", "0x10", "--n"]
# values that run, or fail only with others (--eta for a sampler without it, ddim beyond the schedule's T steps)
GOOD = {"--steps": st.one_of(st.integers(1, 6), st.integers(T + 1, 2 * T)).map(str),
        "--guidance": st.floats(0, 20).map(repr),
        "--sampler": st.one_of(st.sampled_from(CHEAP), st.sampled_from(["auto", "trig-abm"])),
        "--n": st.integers(1, 100).map(str),
        "--threshold": st.one_of(st.sampled_from(["static", "dynamic", "none"]),
                                 st.floats(0.001, 0.999).map(lambda p: f"dynamic:{p!r}")),
        "--seed": st.integers(-2**70, 2**70).map(str),
        "--eta": st.floats(0, 2).map(repr)}
# values that are wrong whatever else is given
BAD = {"--steps": st.one_of(st.integers(-10**6, 0).map(str), st.integers(MAX_STEPS + 1, 10**30).map(str),
                            st.sampled_from(NOT_WHOLE)),
       "--guidance": st.sampled_from(["nan", "-nan", "inf", "-inf", "1e400", "-0.5", "-3", "x", ""]),
       "--sampler": st.sampled_from(["DDIM", "nope", "", "ddim ", "rk4", "euler_a", "--n"]),
       "--n": st.one_of(st.integers(-5, 0).map(str), st.sampled_from(NOT_WHOLE)),
       "--threshold": st.sampled_from(["dynamic:1.5", "dynamic:0", "dynamic:1", "dynamic:nan", "dynamic:x",
                                       "static:0.5", "clip", "", "NONE"]),
       "--seed": st.sampled_from(["x", "1.5", "", "nan", "--n"]),
       "--eta": st.sampled_from(["nan", "inf", "-inf", "-1", "-0.1", "x"])}
# the words a runtime error names each option by
NAMES = {"--steps": "steps", "--guidance": "guidance", "--sampler": "sampler", "--n": "samples",
         "--threshold": "threshold", "--seed": "seed", "--eta": "eta", "--grid": "grid"}


@settings(ONE_RUN, max_examples=SAMPLE_CASES)
@given(options=st.fixed_dictionaries({}, optional=GOOD), bad=st.one_of(st.none(), st.sampled_from(sorted(BAD))),
       data=st.data(), grid=st.sampled_from(["trig", "karras", "uniform"]), into_run=st.booleans())
def test_sample_with_random_arguments_writes_files_or_is_one_clear_error(run, tmp_path, capsys, options, bad, data,
                                                                          grid, into_run):
    """Any mix of sampler arguments, at most one of them wrong whatever the others: a wrong one is named; the rest
    write their samples, or (an option the sampler lacks, more steps than the schedule has) name what clashes."""
    if bad is not None:
        options[bad] = data.draw(BAD[bad], label=bad)
    if options.get("--sampler") in ("auto", "trig-abm"):
        options["--grid"] = grid
    args = [part for key, value in options.items() for part in (key, value)]  # "--steps -inf": argparse's error
    stem = None if into_run else Path(tempfile.mkdtemp(dir=tmp_path)) / "s"
    before = listing(run)
    code, out, err = cli(capsys, ["sample", str(run), *args, "--quiet", *(["--out", str(stem)] if stem else [])])
    event(f"exit {code}" + (" (argparse)" if "usage:" in err else ""))
    if code == 0:
        assert bad is None and "Traceback" not in err, (options, err)
        written = re.search(r"wrote (\S+) and (\S+)", out)
        assert written, out
        png, npz = Path(written[1]), Path(written[2])
        assert png.is_file() and npz.is_file()
        x = np.load(npz)["x"]
        assert x.shape == (int(options.get("--n", 64)), *SHAPE) and np.isfinite(x).all()
        after = listing(run)
        if stem is not None:
            assert after == before  # samples go where --out says, nothing into the run
        else:
            assert npz.parent == run / "samples"
            changed = {k for k in set(after) | set(before) if after.get(k) != before.get(k)}
            assert changed <= {str(png.relative_to(run)), str(npz.relative_to(run))}, changed
        return
    assert code in (1, 2), (code, err)
    line = error_line("sample", err)
    named = [bad] if bad is not None else list(options)  # the wrong option, else one of those that clash
    assert any(key in line or NAMES[key] in line for key in named), (options, line)
    assert listing(run) == before  # nothing written, nothing replaced
    if stem is not None:
        assert not list(stem.parent.iterdir())


def test_huge_steps_and_a_nan_eta_are_named_before_anything_runs(run, tmp_path, capsys):
    """Found by the property: 10**12 steps was torch's RuntimeError allocating an 8 TB time grid, and --eta nan
    wrote samples that were all NaN."""
    for args in (["--sampler", "euler", "--steps", str(10**12)], ["--sampler", "ddim", "--eta", "nan"]):
        code, _, err = cli(capsys, ["sample", str(run), *args, "--n", "2", "--out", str(tmp_path / "s")])
        assert code == 2 and ("steps must be a whole number from 1 to" in err or "argument --eta" in err), err
    assert not list(tmp_path.iterdir())


def test_plans_and_seeds_with_dots_in_their_names_write_files_of_their_own(run, capsys):
    """Found by the property: the default file names were cut at the first dot (Path.with_suffix), so w=2.5 seed 7
    and w=2.7 seed 9 both wrote samples/ddim-2steps-w2.npz, each over the other."""
    written = set()
    for guidance, seed in (("2.5", "7"), ("2.7", "9")):
        code, out, _ = cli(capsys, ["sample", str(run), "--steps", "2", "--n", "2", "--guidance", guidance,
                                    "--seed", seed, "--quiet"])
        assert code == 0
        npz = Path(re.search(r"wrote \S+ and (\S+)", out)[1])
        assert npz.name == f"ddim-2steps-w{guidance}-seed{seed}.npz" and npz.is_file()
        written.add(npz)
    assert len(written) == 2


def test_quiet_sampling_prints_no_progress_bar(run, tmp_path, capsys):
    code, _, err = cli(capsys, ["sample", str(run), "--steps", "3", "--n", "2", "--quiet", "--out",
                                str(tmp_path / "s")])
    assert code == 0 and err == ""


# --- 1b. the Python API with mismatched shapes and labels ---------------------------------------------------------

@st.composite
def labels_for(draw_, batch: int, allow_none: bool = True):
    """None, or class labels for `batch` samples: right half the time, else of another count, range or type."""
    right = st.lists(st.integers(0, CLASSES), min_size=batch, max_size=batch).map(torch.tensor)
    wrong = st.one_of(st.lists(st.integers(-3, 13), max_size=70).map(torch.tensor),  # count or range
                      st.lists(st.floats(0, 9), min_size=batch, max_size=batch).map(torch.tensor),  # floats
                      st.just(torch.zeros(batch, 1, dtype=torch.long)))  # (B, 1)
    return draw_(st.one_of(*([st.none()] if allow_none else []), right, right, wrong))


def labels_ok(labels, batch: int) -> bool:
    return labels is None or (labels.dim() == 1 and not labels.dtype.is_floating_point and len(labels) == batch
                              and (batch == 0 or 0 <= int(labels.min()) <= int(labels.max()) <= CLASSES))


@settings(ONE_RUN, max_examples=API_CASES)
@given(batch=st.integers(0, 4), wrong=st.sets(st.sampled_from(["channels", "height", "width", "rank"]), max_size=3),
       data=st.data(), by_x_T=st.booleans())
def test_deepgm_sample_with_a_mismatched_shape_is_a_value_error_naming_it(run, batch, wrong, data, by_x_T):
    """deepgm.sample on the run's denoiser with a shape (or x_T) of other channels, size or rank, and labels of
    another count, range or type: a ValueError naming the expected shape or the labels (it was torch's
    RuntimeError from a convolution or a skip concatenation, and 12x12 or 16x16 ran at a size never trained)."""
    channels = data.draw(st.sampled_from([0, 2, 3, 4]), label="channels") if "channels" in wrong else SHAPE[0]
    height = data.draw(st.sampled_from([0, 1, 4, 7, 9, 12, 16]), label="height") if "height" in wrong else SHAPE[1]
    width = data.draw(st.sampled_from([1, 4, 12]), label="width") if "width" in wrong else SHAPE[2]
    rank = data.draw(st.sampled_from([3, 5]), label="rank") if "rank" in wrong else 4
    denoiser = load_run(run).model.denoiser
    shape = (batch, channels, height, width, 2)[:rank]
    labels = data.draw(labels_for(batch))
    g = torch.Generator().manual_seed(0)
    where = {"x_T": torch.randn(shape, generator=g)} if by_x_T else {"shape": shape}
    shape_ok, cond_ok = shape == (batch, *SHAPE), labels_ok(labels, batch)
    event(f"shape {'ok' if shape_ok else 'wrong'}, labels {'ok' if cond_ok else 'wrong'}")
    try:
        out = deepgm.sample(denoiser, sampler="ddim", steps=2, cond=None if labels is None else {"y": labels},
                            generator=g, **where)
    except ValueError as err:
        message = str(err)
        names_shape = f"shape (B, {', '.join(map(str, SHAPE))})" in message and str(shape) in message
        names_labels = "label" in message or "cond['y']" in message
        assert not (shape_ok and cond_ok), message
        if shape_ok:
            assert names_labels, message
        elif cond_ok:
            assert names_shape, message
        else:  # both wrong: the first check met names its problem
            assert names_shape or names_labels, message
        return
    assert shape_ok and cond_ok, f"{shape} with labels {labels} accepted"
    assert out.x.shape == shape and bool(torch.isfinite(out.x).all())


@settings(ONE_RUN, max_examples=MODEL_CASES)
@given(n=st.integers(1, 70), key=st.sampled_from(["y", "y", "y", "text", "low_res", "Y"]), data=st.data(),
       through=st.sampled_from(["generate", "draw"]))
def test_generate_with_wrong_conditions_is_a_value_error_naming_them(run, n, key, data, through):
    """The model's generate and the run layer's draw with labels of another count, range, type or key."""
    loaded = load_run(run)
    value = data.draw(labels_for(n, allow_none=False))
    plan = SamplingPlan("ddim", 2)
    ok = key == "y" and labels_ok(value, n)
    event(f"cond {'ok' if ok else 'wrong'}")
    try:
        if through == "generate":
            out = loaded.model.generate(n, {key: value}, torch.Generator().manual_seed(0), plan)
        else:
            out = draw(loaded, n, 0, plan, {key: value})
    except ValueError as err:
        message = str(err)
        assert not ok, message
        if key != "y":
            assert f"no condition(s) ['{key}']" in message and "it takes ['y']" in message, message
        else:
            assert "label" in message or "cond['y']" in message, message
        return
    assert ok, f"cond {key}={value} accepted for {n} samples"
    assert out.x.shape == (n, *SHAPE) and torch.equal(out.cond["y"], value)


# --- 1c. a caption for a model without text conditioning ----------------------------------------------------------

CAPTION = st.one_of(st.sampled_from(["a red circle", "a small blue square in the top left", "-x", "--", " "]),
                    st.text(min_size=0, max_size=20))


@settings(ONE_RUN, max_examples=CAPTION_CASES)
@given(captions=st.lists(CAPTION, min_size=1, max_size=3),
       extra=st.sampled_from([[], ["--sweep", "guidance"], ["--steps", "2", "--sampler", "ddim"], ["--n", "3"]]))
def test_a_caption_for_a_model_without_text_is_one_clear_error(run, tmp_path, capsys, captions, extra):
    """`deepgm generate RUN CAPTION...` on the class-conditional digits: one line saying it has no text."""
    before = listing(run)
    code, _, err = cli(capsys, ["generate", str(run), *extra, "--", *captions])
    assert code == 2
    line = error_line("generate", err)
    if all(c.strip() for c in captions):
        assert "this model is not text-conditioned (its conditions are ['y'])" in line, line
        assert "deepgm sample" in line  # what to do instead
    else:
        assert "a caption is empty" in line, line
    assert listing(run) == before


def test_a_caption_through_the_python_api_is_the_same_error(run):
    before = listing(run)
    with pytest.raises(ValueError, match=r"not text-conditioned \(its conditions are \['y'\]\)"):
        generate_run(run, ["a red circle"], n=2, progress=False)
    loaded = load_run(run)
    with pytest.raises(ValueError, match="not text-conditioned"):
        loaded.model.conditioning.for_captions(["a red circle"])
    with pytest.raises(ValueError, match=r"no condition\(s\) \['text'\]"):
        draw(loaded, 2, 0, SamplingPlan("ddim", 2), {"text": torch.ones(2, 4, dtype=torch.long)})
    assert listing(run) == before
