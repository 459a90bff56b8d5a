"""Cross-attention from image features to caption tokens: softmax attention over the real tokens and a learned
null token, so the output depends on the tokens, not on what sits at padded positions, and an empty caption
(guidance's null condition) is well defined."""

import math

import torch
from torch import nn

from deepgm.conditioning import Context
from deepgm.nets.unet import CrossAttentionBlock


def block(seed: int = 0) -> CrossAttentionBlock:
    torch.manual_seed(seed)
    b = CrossAttentionBlock(8, context_dim=6, num_heads=2)
    for p in b.parameters():  # no zero-initialised output projection: the branch must show
        nn.init.normal_(p, std=0.3)
    return b


def test_cross_attention_is_masked_softmax_attention_to_the_tokens():
    b, x = block(), torch.randn(2, 8, 3, 3)
    tokens, mask = torch.randn(2, 4, 6), torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = b(x, Context(tokens=tokens, mask=mask))
    # the same computation written out: per head, softmax(q k^T / sqrt(d)) v over [null, real tokens]
    q = b.q(b.norm(x).permute(0, 2, 3, 1).reshape(2, 9, 8))
    for i in range(2):
        ctx = torch.cat([b.null[0], tokens[i][mask[i]]])  # (1 + real, 6)
        k, v = b.kv(ctx).chunk(2, dim=-1)
        heads = []
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            weights = torch.softmax(q[i][:, sl] @ k[:, sl].T / math.sqrt(4), dim=-1)
            heads.append(weights @ v[:, sl])
        expected = x[i] + b.proj(torch.cat(heads, dim=1)).T.reshape(8, 3, 3)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


def test_padded_positions_do_not_matter_and_real_tokens_do():
    b, x = block(), torch.randn(2, 8, 4, 4)
    tokens, mask = torch.randn(2, 5, 6), torch.tensor([[True, True, True, False, False]] * 2)
    out = b(x, Context(tokens=tokens, mask=mask))
    garbage = tokens.clone()
    garbage[:, 3:] = 100 * torch.randn(2, 2, 6)
    torch.testing.assert_close(b(x, Context(tokens=garbage, mask=mask)), out)
    changed = tokens.clone()
    changed[:, 1] = torch.randn(2, 6)
    assert not torch.allclose(b(x, Context(tokens=changed, mask=mask)), out, atol=1e-4)


def test_an_empty_caption_attends_to_the_null_token_only():
    b, x = block(), torch.randn(2, 8, 4, 4)
    empty = Context(tokens=torch.randn(2, 3, 6), mask=torch.zeros(2, 3, dtype=torch.bool))
    out = b(x, empty)
    assert torch.isfinite(out).all()
    _, v = b.kv(b.null[0]).chunk(2, dim=-1)  # one key: its value, whatever the query
    expected = x + b.proj(v.expand(16, 8)).T.reshape(1, 8, 4, 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _blocks_by_size(net) -> dict[int, list[str]]:
    """The attention blocks each down/up stage of a U-Net holds, by the feature-map size it runs at."""
    from deepgm.nets.unet import AttentionBlock

    sizes, size = {}, net.image_size
    for stage in list(net.down) + list(net.up):
        names = [type(m).__name__ for m in stage if isinstance(m, (AttentionBlock, CrossAttentionBlock))]
        sizes.setdefault(size, []).extend(names)
        if any(type(m).__name__ == "Downsample" for m in stage):
            size //= 2
        if any(type(m).__name__ == "Upsample" for m in stage):
            size *= 2
    return sizes


def test_cross_attention_can_read_the_caption_where_there_is_no_self_attention():
    import pytest

    from deepgm.conditioning import Conditioning, TextCondition
    from deepgm.nets.unet import UNet

    text = Conditioning([TextCondition(encoder_dim=6)])  # the dimension given: no encoder is loaded to build it
    default = UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), conditioning=text)
    assert "CrossAttentionBlock" not in _blocks_by_size(default)[8]  # by default, only beside self-attention
    wide = UNet(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), conditioning=text,
                cross_attention_resolutions=(8, 4))
    by_size = _blocks_by_size(wide)
    assert by_size[8] == ["CrossAttentionBlock"] * 3  # one down, two up: cross-attention alone at 8x8
    assert by_size[4].count("AttentionBlock") == by_size[4].count("CrossAttentionBlock") == 3
    with pytest.raises(ValueError, match="cross_attention_resolutions"):
        UNet(channels=8, channel_mult=(1, 2), cross_attention_resolutions=(2,), conditioning=text)
