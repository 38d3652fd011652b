"""Tests for gpt2_book.gpt (chapter notebooks/05_gpt.ipynb).

References: Hugging Face's GPT2LMHeadModel (logits, loss), the published GPT-2 parameter counts,
manual attention vs SDPA, and behaviour every language model must have (causality, loss at init
about ln V, memorising one batch).
"""

import json
import math
import sys
from dataclasses import replace

import huggingface_hub
import pytest
import torch
import transformers
from torch.testing import assert_close

from gpt2_book.gpt import GPT, GPTConfig

MODES = ["rope", "learned"]


def _random_ids(config: GPTConfig, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T))


# --- parity with Hugging Face ------------------------------------------------------------------


@pytest.fixture
def hf_checkpoint(tmp_path, seed):
    """A small random GPT2LMHeadModel, saved as config.json + model.safetensors."""
    hf_config = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path)
    return hf_model, tmp_path


def test_logits_and_loss_match_hugging_face(hf_checkpoint):
    hf_model, path = hf_checkpoint
    model = GPT.from_pretrained(path).eval()
    assert model.config.pos_encoding == "learned" and model.config.block_size == 32
    ids = torch.randint(0, 100, (3, 32))
    with torch.no_grad():
        ours, loss = model(ids[:, :-1], ids[:, 1:])
        ref = hf_model(ids, labels=ids)  # Hugging Face shifts the labels itself
    assert_close(ours, ref.logits[:, :-1], atol=1e-5, rtol=0)
    assert_close(loss, ref.loss, atol=1e-5, rtol=0)


def test_greedy_generation_matches_hugging_face(hf_checkpoint):
    hf_model, path = hf_checkpoint
    model = GPT.from_pretrained(path).eval()
    ids = torch.randint(0, 100, (2, 5))
    ours = model.generate(ids, 10, temperature=0)
    ref = ids
    with torch.no_grad():
        for _ in range(10):
            next_id = hf_model(ref).logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, next_id], dim=1)
    assert torch.equal(ours, ref)


def test_state_dict_round_trip(hf_checkpoint):
    _, path = hf_checkpoint
    model = GPT.from_pretrained(path).eval()
    copy = GPT(model.config).eval()
    copy.load_state_dict(model.state_dict())
    assert copy.lm_head.weight is copy.transformer.wte.weight  # loading keeps the tie
    ids = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        assert torch.equal(copy(ids)[0], model(ids)[0])


def test_from_pretrained_accepts_openai_names_without_prefix(hf_checkpoint, tmp_path_factory):
    """OpenAI's own files store `h.0...` without `transformer.` and carry mask buffers."""
    from safetensors.torch import load_file, save_file

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
        assert_close(GPT.from_pretrained(other)(ids)[0], hf_model(ids).logits, atol=1e-5, rtol=0)


def test_from_pretrained_errors(tmp_path, hf_checkpoint):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        GPT.from_pretrained(tmp_path / "no_such_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lacks config.json, model.safetensors.*pickled"):
        GPT.from_pretrained(empty)
    _, path = hf_checkpoint
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    with pytest.raises(ValueError, match="c_attn.weight: checkpoint"):
        GPT.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        GPT.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_pretrained(path)


def test_from_pretrained_downloads_hub_names(hf_checkpoint, monkeypatch):
    """A name that is not a local directory goes to the hub (faked here: no internet)."""
    hf_model, path = hf_checkpoint
    asked = []

    def fake_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = GPT.from_pretrained("openai-community/gpt2").eval()
    assert asked[0][0] == "openai-community/gpt2" and "config.json" in asked[0][1]
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        assert_close(model(ids)[0], hf_model(ids).logits, atol=1e-5, rtol=0)

    def offline(repo_id, allow_patterns):
        raise ConnectionError("no internet")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="neither a local directory nor a downloadable"):
        GPT.from_pretrained("openai-community/gpt2")


def test_from_pretrained_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now fails
    with pytest.raises(ImportError, match="pip install transformers"):
        GPT.from_pretrained("openai-community/gpt2")


# --- behaviour -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_causal(tiny_config, seed, mode):
    model = GPT(replace(tiny_config, pos_encoding=mode)).eval()
    ids = _random_ids(tiny_config, T=32)
    t = 12
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        a, b = model(ids)[0], model(changed)[0]
    assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


@pytest.mark.parametrize("mode", MODES)
def test_manual_attention_matches_sdpa(tiny_config, seed, mode):
    model = GPT(replace(tiny_config, pos_encoding=mode)).eval()
    ids = _random_ids(tiny_config, T=40)
    with torch.no_grad():
        fast = model(ids)[0]
        for block in model.transformer.h:
            block.attn.fast = False
        slow = model(ids)[0]
    assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_batch_elements_are_independent(tiny_config, seed):
    model = GPT(tiny_config).eval()
    ids = _random_ids(tiny_config, B=4, T=24)
    with torch.no_grad():
        together = model(ids)[0]
        alone = torch.cat([model(ids[i : i + 1])[0] for i in range(4)])
    assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_head_dim_independent_of_n_embd(tiny_config, seed, mode):
    config = replace(tiny_config, n_embd=50, n_head=4, head_dim=8, pos_encoding=mode)  # 32 != 50
    model = GPT(config)
    attn = model.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (3 * 4 * 8, 50) and attn.c_proj.weight.shape == (50, 32)
    ids = _random_ids(config)
    logits, loss = model(ids, ids)
    loss.backward()
    assert logits.shape == (2, 16, config.vocab_size)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_rope_accepts_sequences_longer_than_block_size(tiny_config, seed):
    model = GPT(tiny_config).eval()
    ids = _random_ids(tiny_config, B=1, T=tiny_config.block_size + 30)
    with torch.no_grad():
        long = model(ids)[0]
        short = model(ids[:, : tiny_config.block_size])[0]
    assert long.shape[1] == tiny_config.block_size + 30
    assert_close(long[:, : tiny_config.block_size], short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_loss_at_init_is_about_ln_vocab(tiny_config, seed, mode):
    model = GPT(replace(tiny_config, pos_encoding=mode))
    ids, targets = _random_ids(tiny_config, 8, 64), _random_ids(tiny_config, 8, 64)
    _, loss = model(ids, targets)
    assert abs(loss.item() - math.log(tiny_config.vocab_size)) < 0.1


def test_ignore_index_leaves_positions_out_of_the_loss(tiny_config, seed):
    model = GPT(tiny_config)
    ids, targets = _random_ids(tiny_config), _random_ids(tiny_config)
    masked = targets.clone()
    masked[:, 8:] = -1
    assert_close(model(ids, masked)[1], model(ids[:, :8], targets[:, :8])[1])


@pytest.mark.parametrize("mode", MODES)
def test_overfits_one_batch(tiny_config, seed, mode):
    model = GPT(replace(tiny_config, pos_encoding=mode))
    opt = model.configure_optimizer(learning_rate=1e-2, weight_decay=0.0)
    data = _random_ids(tiny_config, B=4, T=33)
    x, y = data[:, :-1], data[:, 1:]
    for _ in range(50):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert model(x, y)[1].item() < 0.05


# --- structure, counts, initialisation -----------------------------------------------------------


@pytest.mark.parametrize(
    "preset, total",
    [
        ("gpt2", 124_439_808),  # OpenAI's checkpoint, tied embedding counted once
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_parameter_counts_of_presets(preset, total):
    config = GPTConfig.from_preset(preset, pos_encoding="learned")
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(config)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - config.block_size * config.n_embd  # minus wpe
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    assert total == V * C + 1024 * C + L * (12 * C * C + 13 * C) + 2 * C


def test_rope_count_is_learned_count_minus_wpe(tiny_config):
    rope = GPT(tiny_config)
    learned = GPT(replace(tiny_config, pos_encoding="learned"))
    wpe = tiny_config.block_size * tiny_config.n_embd
    assert rope.num_params(False) == rope.num_params() == learned.num_params(False) - wpe
    assert not any("rope" in key for key in rope.state_dict())  # cos/sin are not saved


def test_weights_are_tied(tiny_config, seed):
    model = GPT(tiny_config)
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert head is wte and head.data_ptr() == wte.data_ptr()
    opt = model.configure_optimizer(1e-2)
    ids = _random_ids(tiny_config)
    model(ids, ids)[1].backward()
    opt.step()
    assert model.lm_head.weight is model.transformer.wte.weight
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()


def test_one_rope_module_shared_by_all_layers(tiny_config):
    model = GPT(tiny_config)
    assert all(block.attn.rope is model.rope for block in model.transformer.h)
    learned = GPT(replace(tiny_config, pos_encoding="learned"))
    assert learned.rope is None and all(b.attn.rope is None for b in learned.transformer.h)
    assert "wpe" in learned.transformer and "wpe" not in model.transformer


def test_gpt2_parameter_names(tiny_config):
    names = set(dict(GPT(replace(tiny_config, pos_encoding="learned")).named_parameters()))
    for name in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.bias",
        "transformer.h.2.mlp.c_fc.weight",
        "transformer.h.2.mlp.c_proj.weight",
        "transformer.ln_f.bias",
    ]:
        assert name in names, name


def test_init_statistics(seed):
    config = GPTConfig.from_preset("tiny", n_layer=4, n_embd=128, n_head=4)
    model = GPT(config)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            want = residual if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() - want) < 0.1 * want, name
            assert abs(p.mean().item()) < 0.1 * want, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # LayerNorm gains
            assert torch.all(p == 1), name


# --- optimizer ----------------------------------------------------------------------------------


def test_optimizer_groups_cover_each_parameter_once(tiny_config):
    model = GPT(tiny_config)
    opt = model.configure_optimizer(learning_rate=3e-4, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() < 2 for p in no_decay["params"]
    )
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 3e-4


def test_optimizer_is_fused_on_cuda(tiny_config):
    opt = GPT(tiny_config).configure_optimizer(1e-3, device_type="cuda")  # CPU supports it too
    assert opt.defaults["fused"]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"n_embd": 50, "n_head": 3}, "n_embd"),
        ({"head_dim": 0}, "head_dim"),
        ({"head_dim": 15}, "head_dim"),  # odd: RoPE needs pairs
        ({"pos_encoding": "sinusoidal"}, "pos_encoding"),
        ({"dropout": 1.0}, "dropout"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"rope_base": 1.0}, "rope_base"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig.from_preset("tiny", **overrides)


def test_odd_head_dim_is_fine_with_learned_positions():
    GPTConfig.from_preset("tiny", head_dim=15, pos_encoding="learned")


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny"):
        GPTConfig.from_preset("gpt3")


def test_bad_ids_give_clear_errors(tiny_config, seed):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match=r"\[0, 65\)"):
        model(torch.tensor([[1, 2, 65]]))
    with pytest.raises(ValueError, match=r"\[0, 65\)"):
        model(torch.tensor([[-1, 2, 3]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.tensor([1, 2, 3]))
    learned = GPT(replace(tiny_config, pos_encoding="learned"))
    with pytest.raises(ValueError, match="crop the input.*pos_encoding='rope'"):
        learned(_random_ids(tiny_config, B=1, T=tiny_config.block_size + 1))


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_generate(tiny_config, seed, mode):
    model = GPT(replace(tiny_config, pos_encoding=mode)).eval()
    prompt = _random_ids(tiny_config, B=2, T=3)
    n = tiny_config.block_size + 5  # past the learned table: generate crops the context
    out = model.generate(prompt, n, temperature=0.8, top_k=5)
    assert out.shape == (2, 3 + n) and torch.equal(out[:, :3], prompt)
    assert out.min() >= 0 and out.max() < tiny_config.vocab_size
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 8, temperature=0))
    assert torch.equal(greedy, model.generate(prompt, 8, top_k=1))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1.0)
