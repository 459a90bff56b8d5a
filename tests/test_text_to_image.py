"""A text-conditioned diffusion model on captioned shapes, end to end: a frozen pretrained encoder read through
its pooled embedding and cross-attention, caption dropout for guidance, `deepgm generate` and the evaluation's
alignment. Tiny models and few steps: the pipeline, not the quality, is what is checked here."""

import json
import math

import numpy as np
import pytest
import torch

from deepgm.cli import main
from deepgm.conditioning import TextCondition
from deepgm.config import load_config
from deepgm.data import load_dataset
from deepgm.diffusion import Guided
from deepgm.eval.alignment import alignment
from deepgm.models import build_model
from deepgm.train import TrainConfig, Trainer

pytest.importorskip("transformers", reason="the text encoders need the text extra: pip install -e '.[text]'")

TINY = ["data.size=8", "data.n=256", "model.net.channels=16", "model.net.channel_mult=[1,2]",
        "model.net.attention_resolutions=[4]", "model.schedule.T=50", "sample.steps=3", "eval.steps=3"]


def tiny_model(encoder: str = "minilm-l6", *overrides: str):
    config = load_config("t2i-shapes-base", [*TINY, f"model.text.encoder={encoder}", *overrides])
    data = load_dataset("shapes", "train", size=8, n=256)
    torch.manual_seed(0)
    model = build_model(config["model"], data.spec)
    return model, model.conditioning.prepare(data)


def test_a_tiny_text_model_trains_its_loss_falls_and_the_encoder_stays_frozen(tmp_path):
    model, data = tiny_model()
    text = model.conditioning["text"]
    probe = text.tokenize(["a small red circle in the top left", "a big blue square above a green triangle"])
    before = text.embed(probe)
    assert not any(p.requires_grad for p in text.encoder.parameters())
    assert not any("encoder" in name for name in model.state_dict())  # the frozen encoder is not checkpointed
    config = TrainConfig(steps=80, batch_size=32, lr=2e-3, warmup_steps=5, log_every=10, checkpoint_every=0,
                         ema_decay=0.0, device="cpu")
    Trainer(model, data, config, tmp_path, progress=False).fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
    text.encoder.clear_cache()  # recompute, not recall: the weights themselves are unchanged
    after = text.embed(probe)
    torch.testing.assert_close(after.tokens, before.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(after.pooled, before.pooled, atol=1e-5, rtol=0)


def test_dropped_captions_are_empty_and_guidance_is_exact_at_0_and_1():
    model, data = tiny_model("bow")
    model.eval()
    for p in model.parameters():  # no zero-initialised branches: the caption must show in the output
        torch.nn.init.normal_(p, std=0.05)
    ids = data.batch(torch.arange(4))["text"]
    text = model.conditioning["text"]
    null = text.null(ids)
    assert (null == text.pad_id).all() and not text.embed(null).mask.any()
    dropped = text.drop(ids, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, null)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor(0.5)
    with torch.no_grad():
        cond, uncond = model.denoiser(x, t, text=ids), model.denoiser(x, t, text=null)
        assert not torch.allclose(cond.x0, uncond.x0, atol=1e-4)
        for w, expected in ((1.0, cond), (0.0, uncond)):
            torch.testing.assert_close(Guided(model.denoiser, w, model.conditioning)(x, t, text=ids).x0, expected.x0)
        guided = Guided(model.denoiser, 4.0, model.conditioning)(x, t, text=ids)
        torch.testing.assert_close(guided.x0, uncond.x0 + 4 * (cond.x0 - uncond.x0), atol=1e-4, rtol=1e-4)


def test_without_the_pooled_embedding_the_caption_arrives_by_cross_attention_only():
    model, data = tiny_model("bow", "model.text.pooled=false")
    model.eval()
    assert not any("pooled" in name for name in model.state_dict())
    for p in model.parameters():  # no zero-initialised branches: the caption must show in the output
        torch.nn.init.normal_(p, std=0.05)
    ids = data.batch(torch.arange(4))["text"]
    context = model.denoiser.net.context({"text": ids}, 4)
    assert context.vector is None and context.mask.any()
    x, t = torch.randn(4, 3, 8, 8), torch.tensor(0.5)
    with torch.no_grad():
        cond, uncond = model.denoiser(x, t, text=ids), model.denoiser(x, t, text=model.conditioning["text"].null(ids))
    assert not torch.allclose(cond.x0, uncond.x0, atol=1e-4)  # read through the tokens alone
    with pytest.raises(ValueError, match="pooled must be true or false"):
        tiny_model("bow", "model.text.pooled=sometimes")


def test_trainable_layers_over_the_tokens_mix_them_and_ignore_padding():
    model, data = tiny_model("bow", "model.text.layers=2")
    assert any(".refiner.layers.1." in name for name in model.state_dict())  # trained and saved with the U-Net
    refiner = model.denoiser.net.context.readers["text"].refiner.eval()
    for p in refiner.parameters():
        torch.nn.init.normal_(p, std=0.1)
    torch.manual_seed(1)
    tokens, mask = torch.randn(2, 6, refiner.register.shape[-1]), torch.tensor([[1, 1, 1, 1, 0, 0]] * 2).bool()
    with torch.no_grad():
        out = refiner(tokens, mask)
        other = tokens.clone()
        other[:, 4:] = 100 * torch.randn(2, 2, tokens.shape[-1])  # padded positions: anything
        torch.testing.assert_close(refiner(other, mask)[:, :4], out[:, :4])
        other[:, 3] += torch.randn(tokens.shape[-1])  # a real token: every position reads it
        assert (refiner(other, mask)[:, :3] - out[:, :3]).abs().amax(-1).min() > 1e-3
        null = refiner(tokens, torch.zeros_like(mask))  # guidance's null caption
    assert torch.isfinite(null).all()
    ids = data.batch(torch.arange(4))["text"]
    with torch.no_grad():
        x0 = model.denoiser(torch.randn(4, 3, 8, 8), torch.tensor(0.5), text=model.conditioning["text"].null(ids)).x0
    assert torch.isfinite(x0).all()
    with pytest.raises(ValueError, match="model.text.layers must be a whole number"):
        tiny_model("bow", "model.text.layers=-1")


def test_alignment_is_every_kind_agreeing():
    agree = {"shape": torch.tensor([True, True, False, True]), "colour": torch.tensor([True, False, False, True])}
    out = alignment(agree)
    assert out["alignment"] == 0.5 and out["alignment_shape"] == 0.75 and out["alignment_colour"] == 0.5
    assert out["alignment_ci95"] == pytest.approx(1.96 * (0.25 / 4) ** 0.5)
    first_two = torch.tensor([True, True, False, False])  # aligned: yes, no | no, yes
    by = alignment(agree, {"a": first_two, "b": ~first_two, "none": torch.zeros(4, dtype=torch.bool)})
    assert by["alignment_a"] == by["alignment_b"] == 0.5 and math.isnan(by["alignment_none"])
    assert alignment(agree, {"a": torch.tensor([True, False, False, True])})["alignment_a"] == 1.0
    with pytest.raises(ValueError, match="same length"):
        alignment({"shape": torch.ones(3, dtype=torch.bool), "colour": torch.ones(2, dtype=torch.bool)})


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "t2i"
    args = ["train", "t2i-shapes-base", *TINY, "model.text.encoder=bow", "train.steps=4", "train.batch_size=16",
            "train.log_every=2", "train.checkpoint_every=4", "train.sample_every=4", "--out", str(run), "--quiet"]
    assert main(args) == 0
    return run


def test_generate_writes_a_row_per_caption_and_a_guidance_sweep(t2i_run, tmp_path, capsys):
    out = tmp_path / "g"
    args = ["generate", str(t2i_run), "a small red circle in the top left", "a big blue square above a green ball",
            "--n", "3", "--guidance", "4", "--out", str(out)]
    assert main(args) == 0
    assert "NFE per sample: 6" in capsys.readouterr().out  # 3 steps, guided
    arrays = np.load(out.with_suffix(".npz"))
    assert arrays["x"].shape == (6, 3, 8, 8)
    assert list(arrays["captions"][:3]) == ["a small red circle in the top left"] * 3
    sweep = tmp_path / "s"
    assert main(["generate", str(t2i_run), "a red circle", "--sweep", "guidance", "--sweep-weights", "1", "3",
                 "--n", "2", "--out", str(sweep)]) == 0
    x = np.load(sweep.with_suffix(".npz"))["x"]
    assert x.shape == (4, 3, 8, 8) and not np.allclose(x[:2], x[2:])  # same noise, another weight


def test_bad_captions_and_models_get_one_clear_error(t2i_run, tmp_path, capsys):
    assert main(["generate", str(t2i_run), "  ", "--out", str(tmp_path / "a")]) == 2
    assert "caption is empty" in capsys.readouterr().err
    assert main(["generate", str(t2i_run), "red " * 40, "--out", str(tmp_path / "b")]) == 2
    assert "tokens" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown"):
        TextCondition("no-such-encoder").encoder_dim  # noqa: B018 (loading is the check)


def test_eval_reports_alignment_on_the_held_out_splits(t2i_run, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPGM_CACHE", str(tmp_path))  # a fresh attribute net, trained on the tiny split
    assert main(["eval", str(t2i_run), "--n-samples", "8"]) == 0
    metrics = json.loads((t2i_run / "eval.json").read_text())
    for prefix in ("", "test-combos/", "test-phrasings/"):
        assert 0 <= metrics[prefix + "alignment"] <= 1 and np.isfinite(metrics[prefix + "fid"])
    assert (t2i_run / "eval_test-phrasings.png").is_file() and (t2i_run / "eval_captions.png").is_file()
