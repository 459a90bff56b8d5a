"""Training-step speed of shipped configs in bf16 autocast against fp32, on this machine.

For each config: its data, model and batch size, as `deepgm train` builds them; two copies of the model with the
same initial weights, one stepped in fp32 and one under bf16 autocast (the trainer's `train.amp=bf16`),
alternating step by step on one fixed batch (noise, forward, loss, backward, AdamW); images per second as the
median over repeats. This is the measurement behind the README's "Precision and speed" table and the configs'
`amp` choices. A text-conditioned config fills its caption cache in an untimed warm-up step.

Run: python benchmarks/precision_speed.py [--threads 1] [--configs demo-digits ddpm-digits t2i-shapes-base]
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from train_throughput import alternate  # noqa: E402  (timing in turns, the same as against diffusers)

DEFAULT_CONFIGS = ("demo-digits", "ddpm-digits", "t2i-shapes-base")


def make_step(model: torch.nn.Module, batch: dict, dtype: torch.dtype | None, seed: int = 0):
    """One training step of `model` on `batch`, under autocast to `dtype` (None: fp32)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(seed)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss, _ = model.loss(batch, generator)
        loss.backward()
        optimizer.step()

    return step


def measure(config_name: str, repeats: int) -> dict:
    from deepgm.config import load_config
    from deepgm.models import build_model
    from deepgm.pipeline import load_data

    config = load_config(config_name)
    torch.manual_seed(config["seed"])
    data = load_data(config, "train")
    model = build_model(config["model"], data.spec)
    model.conditioning.prepare(data)
    batch_size = config["train"]["batch_size"]
    batch = data.batch(torch.arange(batch_size))
    steps = {"fp32": make_step(model.train(), batch, None), "bf16": make_step(copy.deepcopy(model), batch,
                                                                             torch.bfloat16)}
    times = alternate(steps, repeats)  # the untimed first round: oneDNN's first-call set-up, the caption cache
    rate = {name: batch_size / statistics.median(t) for name, t in times.items()}
    return {"config": config_name, "batch": batch_size, **rate, "ratio": rate["bf16"] / rate["fp32"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--repeats", type=int, default=9, help="timed steps per precision")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    from deepgm.config import resolve_config_path

    for name in args.configs:  # every name checked before the first config's minutes of timing
        try:
            resolve_config_path(name)
        except FileNotFoundError as err:
            parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 kernels: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; images/second, median of {args.repeats}")
    print(f"{'config':<18} {'batch':>5} {'fp32':>8} {'bf16':>8} {'bf16/fp32':>10}")
    for name in args.configs:
        row = measure(name, args.repeats)
        print(f"{name:<18} {row['batch']:5d} {row['fp32']:8.1f} {row['bf16']:8.1f} {row['ratio']:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
