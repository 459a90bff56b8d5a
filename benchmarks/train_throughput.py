"""Training-step throughput and DDIM sampling time: deepgm's U-Net against diffusers' UNet2DModel.

The two networks are matched: the same base channels and channel multipliers, two residual blocks per
level (three on the way up), scale-shift time conditioning, 32 GroupNorm groups, self-attention with the
same number of heads at the 16x16 level and in the middle, strided-conv downsampling, nearest + conv
upsampling, the same sinusoidal time embedding and MLP. Both parameter counts are printed.

Training step = noise a batch, forward, eps-MSE loss, backward, AdamW step, each library's own way:
deepgm's `DiffusionModel.loss` (the path `deepgm train` runs) against diffusers' training recipe
(`DDPMScheduler.add_noise`, `UNet2DModel(...).sample`, `F.mse_loss`). 32x32x3 images, batch 32, in one
process, the two alternating step by step, median over repeats, at equal settings:
  fp32                        float32, NCHW
  bf16                        bf16 autocast, NCHW
  bf16 + channels-last        bf16 autocast, channels-last weights and inputs
Sampling: seconds for 64 samples with 50 DDIM steps (eta = 0, no clipping, fp32, inference mode):
`deepgm.sample(..., sampler="ddim")` against diffusers' `DDIMPipeline` on the matched network, alternating.

Set-up: pip install -e '.[bench]'
Run:    python benchmarks/train_throughput.py [--quick] [--threads N] [--channels 64]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

SETTINGS = {"fp32": (None, False), "bf16": (torch.bfloat16, False), "bf16 + channels-last": (torch.bfloat16, True)}
T_STEPS = 1000  # both libraries: DDPM linear betas 1e-4 .. 0.02 over 1000 steps


def build_pair(channels: int, size: int = 32):
    """deepgm's UNet (inside a DiffusionModel) and diffusers' UNet2DModel with the same architecture."""
    from diffusers import UNet2DModel

    from deepgm.diffusion.model import DiffusionModel
    from deepgm.diffusion.schedule_registry import make_schedule
    from deepgm.nets.unet import UNet

    heads = 4
    ours = UNet(in_channels=3, channels=channels, channel_mult=(1, 2, 2), num_res_blocks=2,
                attention_resolutions=(size // 2,), image_size=size, num_heads=heads)
    model = DiffusionModel(ours, make_schedule("linear", T=T_STEPS), "eps", "simple", levels=256)
    theirs = UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(channels, 2 * channels, 2 * channels),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=2 * channels // heads,
        norm_num_groups=32, resnet_time_scale_shift="scale_shift", time_embedding_type="positional",
        flip_sin_to_cos=True, freq_shift=0, downsample_type="conv", upsample_type="conv", dropout=0.0)
    return model, theirs


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_train_steps(model, theirs, dtype, channels_last: bool, batch: int, seed: int = 0):
    """Two closures, each one full training step of its library on a fixed batch of images."""
    from diffusers import DDPMScheduler

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, theirs = model.to(memory_format=fmt).train(), theirs.to(memory_format=fmt).train()
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1).contiguous(memory_format=fmt)
    ours_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    scheduler = DDPMScheduler(num_train_timesteps=T_STEPS, beta_schedule="linear")
    g_ours, g_theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)

    def ours() -> float:
        ours_opt.zero_grad(set_to_none=True)
        with _autocast(dtype):
            loss, _ = model.loss({"x": x0}, g_ours)
        loss.backward()
        ours_opt.step()
        return float(loss.detach())

    def diffusers_step() -> float:
        their_opt.zero_grad(set_to_none=True)
        noise = torch.randn(x0.shape, generator=g_theirs).contiguous(memory_format=fmt)
        t = torch.randint(0, T_STEPS, (batch,), generator=g_theirs)
        noisy = scheduler.add_noise(x0, noise, t)
        with _autocast(dtype):
            pred = theirs(noisy, t).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        their_opt.step()
        return float(loss.detach())

    return ours, diffusers_step


def alternate(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run the functions in turn `repeats` times after `warmup` untimed rounds; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def make_samplers(model, theirs, n: int, steps: int, seed: int = 0):
    from diffusers import DDIMPipeline, DDIMScheduler

    import deepgm

    model, theirs = model.to(memory_format=torch.contiguous_format).eval(), theirs.to(
        memory_format=torch.contiguous_format).eval()
    pipe = DDIMPipeline(unet=theirs, scheduler=DDIMScheduler(num_train_timesteps=T_STEPS, beta_schedule="linear",
                                                             clip_sample=False, set_alpha_to_one=True))
    pipe.set_progress_bar_config(disable=True)

    def ours():
        with torch.inference_mode():
            out = deepgm.sample(model.denoiser, shape=(n, 3, 32, 32), sampler="ddim", steps=steps,
                                generator=torch.Generator().manual_seed(seed))
        assert out.nfe == steps
        return out.x

    def diffusers_pipe():
        with torch.inference_mode():
            return pipe(batch_size=n, num_inference_steps=steps, eta=0.0, output_type="np",
                        generator=torch.Generator().manual_seed(seed)).images

    return ours, diffusers_pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=64, help="base channels of both U-Nets")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="timed training steps per library and setting")
    parser.add_argument("--sample-repeats", type=int, default=3, help="timed sampling runs per library")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="3 training repeats, 1 sampling run of 10 steps")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.sample_repeats, args.ddim_steps = 3, 1, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    torch.manual_seed(0)
    model, theirs = build_pair(args.channels)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 kernels: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"parameters: deepgm UNet {count(model):,}   diffusers UNet2DModel {count(theirs):,}   "
          f"(base channels {args.channels}, mult 1-2-2, 2 res blocks, attention at 16x16 + middle, 4 heads)\n")

    print(f"training step, 32x32x3, batch {args.batch}: images/second (median of {args.repeats}, alternating)")
    print(f"{'setting':<22} {'deepgm':>9} {'diffusers':>10} {'deepgm/diffusers':>17}")
    for name, (dtype, channels_last) in SETTINGS.items():
        ours, diffusers_step = make_train_steps(model, theirs, dtype, channels_last, args.batch)
        times = alternate({"deepgm": ours, "diffusers": diffusers_step}, args.repeats)
        rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
        print(f"{name:<22} {rate['deepgm']:9.1f} {rate['diffusers']:10.1f} {rate['deepgm'] / rate['diffusers']:16.2f}x",
              flush=True)

    print(f"\nsampling: seconds for {args.samples} samples, {args.ddim_steps} DDIM steps, fp32 "
          f"(median of {args.sample_repeats}, alternating)")
    ours, diffusers_pipe = make_samplers(model, theirs, args.samples, args.ddim_steps)
    times = alternate({"deepgm": ours, "diffusers": diffusers_pipe}, args.sample_repeats, warmup=0)
    sec = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'':<22} {'deepgm':>9} {'diffusers':>10} {'diffusers/deepgm':>17}")
    print(f"{'ddim':<22} {sec['deepgm']:9.2f} {sec['diffusers']:10.2f} {sec['diffusers'] / sec['deepgm']:16.2f}x")


if __name__ == "__main__":
    main()
