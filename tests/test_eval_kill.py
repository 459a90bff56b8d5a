"""kill -9 during `deepgm eval RUN` (issue 17, "Hardening"): at whatever moment the kill lands, the run's eval.json
is absent (if it was), the previous file untouched, or the new one complete, never half of one; and evaluating again
afterwards gives the numbers of an uninterrupted evaluation, to the last digit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deepgm.cli import main
from deepgm.files import write_json
from test_bad_input_trained import train_tiny

TINY_EVAL = ("eval.n_samples=16", "eval.steps=2", "eval.vlb_examples=4")
KILL_AT = (0.3, 0.55, 0.75, 0.85, 0.92, 0.97)  # fractions of an uninterrupted child's time (imports included)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("eval-kill"), TINY_EVAL)


def numbers(metrics: dict) -> dict:
    """What an evaluation reports, less its timings."""
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def test_kill_9_during_eval_leaves_no_half_written_eval_json_and_a_rerun_gives_the_same_numbers(run, capsys):
    path = run / "eval.json"
    # the uninterrupted evaluation (in this process: the feature network is trained once, into the session's cache,
    # which the children below read through DEEPGM_CACHE)
    assert main(["eval", str(run)]) == 0
    in_process = numbers(json.loads(path.read_text()))
    assert numbers(json.loads(capsys.readouterr().out)) == in_process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "deepgm.cli", "eval", str(run)]
    start = time.monotonic()
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    duration = time.monotonic() - start
    assert child.returncode == 0, child.stderr[-2000:]
    # the uninterrupted evaluation in a fresh process, as every killed one below is: their numbers must match it to
    # the last digit. This process agrees with it to float32 rounding only: on some machines (2026-12-07's) its
    # FID floor differs in the 8th digit, this process's feature network being the one it trained rather than the one
    # read back from the cache; anything wrong (other samples, a half-written file) is off by far more
    reference = numbers(json.loads(child.stdout))
    assert reference.keys() == in_process.keys()
    for key, value in in_process.items():
        close = isinstance(value, float) and reference[key] == pytest.approx(value, rel=1e-6)
        assert close or reference[key] == value, (key, reference[key], value)

    old = {**reference, "note": "the evaluation before the kill"}
    killed = []
    for i, fraction in enumerate(KILL_AT):
        had_one = bool(i % 2)  # every other kill finds an eval.json from before, the others none
        if had_one:
            write_json(path, old)
        else:
            path.unlink(missing_ok=True)
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL)
        killed.append(process.wait() == -signal.SIGKILL)  # False: it had finished before the kill
        if path.exists():
            metrics = json.loads(path.read_text())  # whole: it parses
            assert metrics == old or numbers(metrics) == reference, (fraction, metrics)
        else:
            assert not had_one, f"eval.json from before is gone after a kill at {fraction:.0%}"
    assert sum(killed) >= 2, f"the kills came too late to interrupt anything: {killed}"

    assert main(["eval", str(run)]) == 0  # after the kills: this process's numbers, as before them
    assert numbers(json.loads(path.read_text())) == in_process
    assert numbers(json.loads(capsys.readouterr().out)) == in_process
