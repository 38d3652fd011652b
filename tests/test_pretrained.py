"""Tests for gpt2_book.pretrained (chapter notebooks/10_pretrained.ipynb).

Reference: Hugging Face's GPT2LMHeadModel with random weights, saved with `save_pretrained` into
a temporary directory (no internet needed): our model loaded from that directory must give the
same logits, loss and greedy tokens. Tolerances: float32, the same weights and the same
operations in another order, so logits agree to ~1e-6; 1e-5 leaves room for other BLAS builds.
An optional test loads OpenAI's real `gpt2` and skips, saying why, where the hub is unreachable.
"""

import json
import sys

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from gpt2_book import pretrained
from gpt2_book.generate import generate
from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.pretrained import (
    HUB_NAMES,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    from_pretrained,
    save_pretrained,
    to_hf_state_dict,
)

TOL = {"atol": 1e-5, "rtol": 0}
SIZES = {  # OpenAI's four sizes: (n_layer, n_head, n_embd)
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


def _hf_config(**sizes) -> transformers.GPT2Config:
    return transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **sizes)


@pytest.fixture
def hf_checkpoint(tmp_path, seed):
    """A small random GPT2LMHeadModel, saved as config.json + model.safetensors."""
    config = _hf_config(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=32)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    return hf_model, tmp_path


# --- parity with Hugging Face --------------------------------------------------------------------


def test_logits_and_loss_match_hugging_face(hf_checkpoint):
    hf_model, path = hf_checkpoint
    model = from_pretrained(path).eval()
    assert model.config.pos_encoding == "learned" and model.config.block_size == 32
    ids = torch.randint(0, 100, (3, 32))
    with torch.no_grad():
        ours, loss = model(ids[:, :-1], ids[:, 1:])
        ref = hf_model(ids, labels=ids)  # Hugging Face shifts the labels itself
    assert_close(ours, ref.logits[:, :-1], **TOL)
    assert_close(loss, ref.loss, **TOL)


def test_greedy_generation_matches_hugging_face(hf_checkpoint):
    hf_model, path = hf_checkpoint
    model = from_pretrained(path).eval()
    ids = torch.randint(0, 100, (2, 5))
    ours = generate(model, ids, max_new_tokens=10, temperature=0)
    ref = ids
    with torch.no_grad():
        for _ in range(10):
            next_id = hf_model(ref).logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, next_id], dim=1)
    assert torch.equal(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
def test_each_gpt2_size_converts_at_reduced_depth(tmp_path, seed, size):
    """Every published width, head count, vocabulary and context, with one layer."""
    _, n_head, n_embd = SIZES[size]
    hf_model = transformers.GPT2LMHeadModel(_hf_config(n_layer=1, n_head=n_head, n_embd=n_embd))
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path).eval()
    assert (model.config.n_head, model.config.n_embd, model.config.vocab_size) == (
        n_head,
        n_embd,
        50257,
    )
    ids = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert_close(model(ids)[0], hf_model.eval()(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", list(SIZES))
def test_each_gpt2_size_maps_every_tensor_at_full_depth(size):
    """The name map covers all of a full-size checkpoint; shapes only, on the meta device."""
    n_layer, n_head, n_embd = SIZES[size]
    hf_config = _hf_config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    with torch.device("meta"):
        hf_state = transformers.GPT2LMHeadModel(hf_config).state_dict()
        model = GPT(config_from_hf(hf_config.to_dict()))
    state = from_hf_state_dict(hf_state)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].shape == v.shape for k, v in expected.items())
    assert model.config == GPTConfig.from_preset(size, pos_encoding="learned")


# --- conversion ----------------------------------------------------------------------------------


def test_loaded_model_is_tied_trainable_and_takes_dropout(hf_checkpoint):
    _, path = hf_checkpoint
    model = from_pretrained(path, dropout=0.1)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    assert model.config.dropout == 0.1 and model.transformer.drop.p == 0.1
    model(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))[1].backward()
    assert model.transformer.wte.weight.grad is not None


def test_state_dict_round_trip(hf_checkpoint):
    _, path = hf_checkpoint
    model = from_pretrained(path).eval()
    copy = GPT(model.config).eval()
    copy.load_state_dict(model.state_dict())
    assert copy.lm_head.weight is copy.transformer.wte.weight  # loading keeps the tie
    ids = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        assert torch.equal(copy(ids)[0], model(ids)[0])


def test_hf_names_round_trip(hf_checkpoint):
    _, path = hf_checkpoint
    tensors = load_file(path / "model.safetensors")
    back = to_hf_state_dict(from_hf_state_dict(tensors))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_save_pretrained_is_read_by_hugging_face(tmp_path, tiny_config, seed):
    """Our own model, written in Hugging Face's format, loads into GPT2LMHeadModel."""
    from dataclasses import replace

    model = GPT(replace(tiny_config, pos_encoding="learned")).eval()
    save_pretrained(model, tmp_path / "ours")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 20))
    with torch.no_grad():
        assert_close(hf_model(ids).logits, model(ids)[0], **TOL)
    assert from_pretrained(tmp_path / "ours").config == model.config


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"pos_encoding": "rope"}, "pos_encoding"),
        ({"bias": False}, "bias"),
        ({"head_dim": 8}, "head_dim"),
    ],
)
def test_config_to_hf_refuses_what_gpt2_cannot_express(tiny_config, overrides, field):
    from dataclasses import replace

    config = replace(tiny_config, **{"pos_encoding": "learned", **overrides})
    with pytest.raises(ValueError, match=field):
        config_to_hf(config)


def test_accepts_openai_names_without_prefix(hf_checkpoint, tmp_path_factory):
    """OpenAI's own files store `h.0...` without `transformer.` and carry mask buffers."""
    hf_model, path = hf_checkpoint
    tensors = {
        k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()
    }
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()  # an old causal-mask buffer
    other = tmp_path_factory.mktemp("openai")
    save_file(tensors, other / "model.safetensors")
    (other / "config.json").write_text((path / "config.json").read_text())
    ids = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        assert_close(from_pretrained(other)(ids)[0], hf_model(ids).logits, **TOL)


# --- errors -------------------------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path, hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="neither a directory nor a hub name.*gpt2-medium"):
        from_pretrained("gpt-2")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lacks config.json, model.safetensors.*pickled"):
        from_pretrained(empty)
    _, path = hf_checkpoint
    config = json.loads((path / "config.json").read_text())
    for change, message in [
        ({"n_embd": 32}, "c_attn.weight: checkpoint"),
        ({"model_type": "llama"}, "model_type"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ]:
        (path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            from_pretrained(path)
    with pytest.raises(ValueError, match="lacks n_layer"):
        config_from_hf({k: v for k, v in config.items() if k != "n_layer"})


def test_unknown_tensor_is_an_error_not_ignored():
    with pytest.raises(ValueError, match="not GPT-2 tensors: transformer.h.0.attn.q_proj.weight"):
        from_hf_state_dict({"transformer.h.0.attn.q_proj.weight": torch.zeros(2, 2)})


def test_hub_names_are_downloaded(hf_checkpoint, monkeypatch):
    """A name that is not a local directory goes to the hub (faked here: no internet)."""
    hf_model, path = hf_checkpoint
    asked = []

    def fake_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = from_pretrained("gpt2").eval()
    from_pretrained("someone/gpt2-finetuned")
    assert [repo for repo, _ in asked] == [HUB_NAMES["gpt2"], "someone/gpt2-finetuned"]
    assert "config.json" in asked[0][1] and "*.safetensors" in asked[0][1]
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        assert_close(model(ids)[0], hf_model(ids).logits, **TOL)

    def offline(repo_id, allow_patterns):
        raise ConnectionError("no internet")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="could not be downloaded.*ConnectionError: no internet"):
        from_pretrained("gpt2")


def test_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now fails
    with pytest.raises(ImportError, match="pip install transformers"):
        from_pretrained("gpt2")


# --- OpenAI's real weights (needs the hub or its cache) -----------------------------------------


@pytest.fixture(scope="module")
def real_gpt2_dir():
    try:
        return pretrained.checkpoint_dir("gpt2")
    except OSError as err:
        pytest.skip(f"OpenAI's gpt2 is neither reachable on the hub nor cached: {err}")


@pytest.mark.slow
def test_real_gpt2_matches_hugging_face(real_gpt2_dir):
    model = from_pretrained(real_gpt2_dir).eval()
    assert model.num_params(non_embedding=False) == 124_439_808
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(real_gpt2_dir).eval()
    ids = torch.tensor([[15496, 11, 616, 3290, 318, 13779]])  # "Hello, my dog is cute"
    with torch.no_grad():
        assert_close(model(ids)[0], hf_model(ids).logits, atol=1e-4, rtol=0)
