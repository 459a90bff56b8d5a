"""A DDPM-style U-Net (Ho et al. 2020; Nichol & Dhariwal 2021) for denoising images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepgm.conditioning import Conditioning, Context, ContextReader
from deepgm.nets.embeddings import TimeEmbedding


def _groups(channels: int) -> int:
    """Largest number of GroupNorm groups <= 32 that divides `channels`."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that runs channels-last CPU inputs through the contiguous kernel and returns channels-last:
    PyTorch's channels-last CPU GroupNorm is several times slower than that (over ten times in bfloat16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _norm(channels: int) -> GroupNorm:
    """GroupNorm with the group count chosen by `_groups`."""
    return GroupNorm(_groups(channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place (so a residual branch starts as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Two 3x3 convs; the embedding modulates the second GroupNorm by scale and shift."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.norm2, self.drop = _norm(out_ch), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


def _check_heads(channels: int, num_heads: int, block: str) -> None:
    if channels % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the {channels} channels of the {block}; "
                         f"choose num_heads or channels accordingly")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention, run in float32 on CPU where autograd records a bf16/fp16 one: there its
    reduced-precision backward is 2-5x slower than float32's (torch 2.13, 32x4 heads x 256 tokens x 16: 67 against
    37 ms forward and backward), while without gradients bf16 is the faster one."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, as a residual branch."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        _check_heads(channels, num_heads, "attention block")
        self.heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 1x1 convs run as matmuls over tokens so that q, k, v have a unit-stride last dimension: with it,
        # scaled_dot_product_attention takes its fused kernel (on CPU too) instead of the unfused math path.
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, H*W, C); a view if channels-last
        qkv = F.linear(tokens, self.qkv.weight.reshape(3 * c, c), self.qkv.bias)  # (B, H*W, 3C)
        q, k, v = qkv.reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v)  # (B, heads, H*W, C/heads)
        out = F.linear(out.transpose(1, 2).reshape(b, h * w, c), self.proj.weight.reshape(c, c), self.proj.bias)
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)


class CrossAttentionBlock(nn.Module):
    """Multi-head attention from the H*W positions of a feature map to context tokens (B, L, D) with a mask
    (B, L), as a residual branch. A learned null token is always attended to, so a caption with no tokens (the
    null condition of guidance) is well defined, and padded positions never are."""

    def __init__(self, channels: int, context_dim: int, num_heads: int = 4):
        super().__init__()
        _check_heads(channels, num_heads, "cross-attention block")
        self.heads = num_heads
        self.norm = _norm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.null = nn.Parameter(torch.zeros(1, 1, context_dim))
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = torch.cat([self.null.expand(b, 1, -1).to(context.tokens.dtype), context.tokens], dim=1)
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), context.mask.to(x.device)], dim=1)
        q = self.q(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, H*W, C)
        k, v = self.kv(tokens.to(x.dtype)).chunk(2, dim=-1)  # (B, 1 + L, C) each
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        out = attention(split(q), split(k), split(v), mask[:, None, None, :])
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbSequential(nn.ModuleList):
    """Apply layers in order, passing the embedding to the residual blocks and the context to cross-attention."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttentionBlock):
                h = layer(h, context)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """eps/x0/v network for images: (x_t (B, C, H, W), t (B,), **cond) -> (B, C_out, H, W).

    `conditioning` names what the network reads from cond (deepgm.conditioning): vector conditions (class labels,
    a caption's pooled embedding) are added to the time embedding, image conditions are concatenated to x_t, and
    token conditions (a caption's token embeddings) are read by cross-attention at `cross_attention_resolutions`
    (by default the self-attention ones), after the self-attention block where there is one. Cross-attention to a
    few dozen tokens is cheap at any size, while self-attention is quadratic in the pixels: reading the caption at
    the full resolution, where objects are drawn, costs little without self-attention there.
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (), image_size: int = 8, dropout: float = 0.0,
                 conditioning: Conditioning | None = None, num_heads: int = 4,
                 cross_attention_resolutions: tuple[int, ...] | None = None):
        super().__init__()
        levels = len(channel_mult)
        if levels == 0:
            raise ValueError("channel_mult must list at least one resolution level, e.g. (1, 2)")
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1) = "
                             f"{2 ** (levels - 1)}; use fewer channel_mult levels or another image_size")
        resolutions = [image_size // 2**i for i in range(levels)]
        if not set(attention_resolutions) <= set(resolutions):
            raise ValueError(f"attention_resolutions={tuple(attention_resolutions)} must be among the "
                             f"feature-map sizes {resolutions} of this U-Net")
        if cross_attention_resolutions is None:
            cross_attention_resolutions = attention_resolutions
        if not set(cross_attention_resolutions) <= set(resolutions):
            raise ValueError(f"cross_attention_resolutions={tuple(cross_attention_resolutions)} must be among the "
                             f"feature-map sizes {resolutions} of this U-Net")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.image_size = image_size
        self.conditioning = conditioning or Conditioning()
        cond_channels = sum(c.channels for c in self.conditioning.conditions.values() if c.kind == "image")
        self.time = TimeEmbedding(channels)
        emb_dim = self.time.out_dim
        self.context = ContextReader(self.conditioning, emb_dim)

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout)

        reads_tokens = any(c.kind == "tokens" for c in self.conditioning.conditions.values())

        def attn(ch: int, size: int, always: bool = False) -> list[nn.Module]:
            """Self-attention at its resolutions, then cross-attention to the tokens (if read) at its own."""
            layers = [AttentionBlock(ch, num_heads)] if always or size in attention_resolutions else []
            if reads_tokens and (always or size in cross_attention_resolutions):
                layers.append(CrossAttentionBlock(ch, emb_dim, num_heads))
            return layers

        self.inp = nn.Conv2d(in_channels + cond_channels, channels, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(EmbSequential([res(ch, mult * channels), *attn(mult * channels,
                                                                                resolutions[level])]))
                ch = mult * channels
                skips.append(ch)
            if level != levels - 1:
                self.down.append(EmbSequential([Downsample(ch)]))
                skips.append(ch)
        self.mid = EmbSequential([res(ch, ch), *attn(ch, resolutions[-1], always=True), res(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mult * channels), *attn(mult * channels, resolutions[level])]
                ch = mult * channels
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(EmbSequential(layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        # checked here, where the sizes are known: other shapes fail deep in a convolution or a skip concatenation
        # with torch's RuntimeError, or (other sizes that divide) run with attention at sizes it was not built for
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"this U-Net takes images of shape (B, {', '.join(map(str, expected))}) (channels, "
                             f"height, width), got x of shape {tuple(x.shape)}")
        b = x.shape[0]
        context = self.context(cond, b)
        if context.image is not None:
            if context.image.shape[2:] != x.shape[2:]:
                raise ValueError(f"the conditioning image is {tuple(context.image.shape[2:])}, x_t is "
                                 f"{tuple(x.shape[2:])}; upsample it to the size of x_t")
            x = torch.cat([x, context.image.to(x.dtype)], dim=1)  # (B, C + C_cond, H, W)
        emb = self.time(t.reshape(1).expand(b) if t.numel() == 1 else t)
        if context.vector is not None:
            emb = emb + context.vector
        h = self.inp(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb, context)
            hs.append(h)
        h = self.mid(h, emb, context)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)  # (B, C + C_skip, H, W)
        return self.out(h)
