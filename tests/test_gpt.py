"""Tests for gpt2_book.gpt (chapter notebooks/05_gpt.ipynb).

References: the published GPT-2 parameter counts, manual attention vs SDPA, and behaviour every
language model must have (causality, loss at init about ln V, memorising one batch). Parity
with Hugging Face's GPT2LMHeadModel is in test_pretrained.py, which loads its weights.
"""

import copy
import math
import re
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from gpt2_book.attention import CausalSelfAttention
from gpt2_book.gpt import GPT, GPTConfig

MODES = ["rope", "learned"]


def _random_ids(config: GPTConfig, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T))


def _with_manual_attention(model: GPT) -> GPT:
    """A copy of model whose attention layers are built with fast=False, same weights."""
    slow = copy.deepcopy(model)
    for block in slow.transformer.h:
        fast = block.attn
        block.attn = CausalSelfAttention(
            n_embd=fast.c_proj.out_features,
            n_head=fast.n_head,
            head_dim=fast.head_dim,
            bias=fast.c_attn.bias is not None,
            rope=slow.rope,
            fast=False,
        )
        block.attn.load_state_dict(fast.state_dict())
    return slow.eval()


class ListCache:
    """The smallest object with KVCache's `update` (the real one is tested in test_generate)."""

    k = v = None

    def update(self, k, v, start_pos):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


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
    slow_model = _with_manual_attention(model)
    assert not any(block.attn.fast for block in slow_model.transformer.h)
    ids = _random_ids(tiny_config, T=40)
    with torch.no_grad():
        fast, slow = model(ids)[0], slow_model(ids)[0]
    assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_kv_caches_prefill_then_steps_equals_one_call(tiny_config, seed, mode):
    model = GPT(replace(tiny_config, pos_encoding=mode)).eval()
    ids = _random_ids(tiny_config, T=20)
    caches = [ListCache() for _ in range(tiny_config.n_layer)]
    with torch.no_grad():
        full = model(ids)[0]
        parts = [model(ids[:, :12], kv_caches=caches)[0]]
        for t in range(12, 20):
            step = model(ids[:, t : t + 1], start_pos=t, kv_caches=caches, check_ids=False)[0]
            parts.append(step)
        last = model(ids, last_only=True)[0]
    assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert last.shape == (2, 1, tiny_config.vocab_size)
    assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
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
        ({"gelu": "erf"}, "gelu"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig.from_preset("tiny", **overrides)


# Issue 13: a field of the wrong kind is a ValueError that names it, shows it and says what to
# pass; before, these were accepted silently (a bool for an int, nan, "no" switching biases on)
# or failed deep inside with a TypeError or a raw message.
_BAD_SETTINGS = [
    ({"n_layer": True}, "GPTConfig.n_layer must be a positive int, got True (bool)"),
    ({"n_head": 3.0}, "GPTConfig.n_head must be a positive int, got 3.0 (float)"),
    ({"vocab_size": "65"}, "GPTConfig.vocab_size must be a positive int, got '65' (str)"),
    ({"head_dim": True}, "GPTConfig.head_dim must be a positive int, or None, got True"),
    ({"rope_base": "x"}, "GPTConfig.rope_base must be a finite number, got 'x' (str)"),
    ({"rope_base": math.nan}, "GPTConfig.rope_base must be a finite number, got nan"),
    ({"rope_base": math.inf}, "GPTConfig.rope_base must be a finite number, got inf"),
    ({"mlp_ratio": math.nan}, "GPTConfig.mlp_ratio must be a finite number, got nan"),
    ({"mlp_ratio": True}, "GPTConfig.mlp_ratio must be a finite number, got True (bool)"),
    ({"mlp_ratio": 0.01}, "mlp_ratio > 0 with mlp_ratio * n_embd >= 1"),  # 0 hidden units
    ({"dropout": math.nan}, "GPTConfig.dropout must be a finite number, got nan"),
    ({"dropout": "0.1"}, "GPTConfig.dropout must be a finite number, got '0.1' (str)"),
    ({"bias": "no"}, "GPTConfig.bias must be True or False, got 'no' (str)"),
    ({"bias": 1}, "GPTConfig.bias must be True or False, got 1 (int)"),
    ({"pos_encoding": ["rope"]}, "GPTConfig.pos_encoding must be one of 'rope', 'learned'"),
    ({"gelu": ["tanh"]}, "GPTConfig.gelu must be one of 'tanh', 'exact', got ['tanh']"),
]


@pytest.mark.parametrize(
    "overrides, message", _BAD_SETTINGS, ids=[str(overrides) for overrides, _ in _BAD_SETTINGS]
)
def test_config_refuses_wrong_kinds_with_what_to_pass(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GPTConfig.from_preset("tiny", **overrides)


def test_config_takes_ints_for_float_fields():
    config = GPTConfig.from_preset("tiny", mlp_ratio=4, dropout=0, rope_base=10000, bias=False)
    assert GPT(config).num_params() > 0


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_gelu_setting_reaches_every_mlp(tiny_config, gelu):
    model = GPT(replace(tiny_config, gelu=gelu))
    want = {"tanh": "tanh", "exact": "none"}[gelu]  # nn.GELU's name for it
    assert {block.mlp.gelu.approximate for block in model.transformer.h} == {want}


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
    with pytest.raises(ValueError, match="crop the input"):  # also without the id check
        learned(_random_ids(tiny_config, B=1, T=3), start_pos=tiny_config.block_size - 2)


def test_check_ids_false_skips_only_the_id_check(tiny_config, seed, monkeypatch):
    model = GPT(tiny_config).eval()
    ids = _random_ids(tiny_config)
    calls = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append(1) or real_aminmax(t))
    with torch.no_grad():
        checked, unchecked = model(ids)[0], model(ids, check_ids=False)[0]
    assert calls == [1]  # one check, in the first call only
    assert torch.equal(checked, unchecked)
    with pytest.raises(IndexError):  # no friendly message: the embedding's own error
        model(torch.tensor([[1, 2, 65]]), check_ids=False)
    with pytest.raises(ValueError, match=r"\(B, T\)"):  # shape checks stay on
        model(torch.tensor([1, 2, 3]), check_ids=False)


# Issue 13: what forward takes, refused with a ValueError that says what to pass (before: a
# RuntimeError from the embedding or the reshape, an AttributeError, an IndexError).
_BAD_IDS = {
    "float": lambda ids: ids.float(),
    "bool": lambda ids: ids.bool(),
    "uint8": lambda ids: ids.to(torch.uint8),
    "list": lambda ids: ids.tolist(),
    "numpy": lambda ids: ids.numpy(),
    "T=0": lambda ids: ids[:, :0],
    "B=0": lambda ids: ids[:0],
    "1-D": lambda ids: ids[0],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("check_ids", [True, False])
@pytest.mark.parametrize("bad", list(_BAD_IDS), ids=str)
def test_forward_refuses_ids_it_cannot_look_up(tiny_config, seed, mode, check_ids, bad):
    model = GPT(replace(tiny_config, pos_encoding=mode))
    idx = _BAD_IDS[bad](_random_ids(tiny_config))
    with pytest.raises(ValueError, match=re.escape("idx must be a (B, T) tensor of token ids")):
        model(idx, check_ids=check_ids)


@pytest.mark.parametrize(
    "make_targets, message",
    [
        (lambda ids: torch.full_like(ids, 65), r"targets must lie in \[0, 65\).*from 65 to 65"),
        (lambda ids: torch.full_like(ids, -2), r"or be -1 to leave a position out"),
        (lambda ids: ids.float(), "targets must be a tensor of ids shaped like idx, \\(2, 16\\)"),
        (lambda ids: ids[:, :8], "targets must be a tensor of ids shaped like idx"),
        (lambda ids: ids.tolist(), "targets must be a tensor of ids shaped like idx"),
    ],
    ids=["too large", "below -1", "float", "shape", "list"],
)
def test_forward_refuses_bad_targets(tiny_config, seed, make_targets, message):
    model, ids = GPT(tiny_config), _random_ids(tiny_config)
    with pytest.raises(ValueError, match=message):
        model(ids, make_targets(ids))


def test_int32_ids_and_targets_give_the_same_loss(tiny_config, seed):
    model, ids, targets = GPT(tiny_config), _random_ids(tiny_config), _random_ids(tiny_config)
    logits, loss = model(ids, targets)
    logits32, loss32 = model(ids.int(), targets.int())
    assert_close(logits32, logits, rtol=0, atol=0)
    assert_close(loss32, loss, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)  # learned mode used to fail with an IndexError
@pytest.mark.parametrize("start_pos", [-3, 1.5, True, "0", None])
def test_start_pos_must_be_a_non_negative_int(tiny_config, seed, mode, start_pos):
    model = GPT(replace(tiny_config, pos_encoding=mode))
    with pytest.raises(ValueError, match="start_pos must be an int >= 0, got "):
        model(_random_ids(tiny_config, T=3), start_pos=start_pos)


def test_kv_caches_must_hold_one_cache_per_layer(tiny_config, seed):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match="one cache per layer, n_layer=3, got 2"):
        model(_random_ids(tiny_config), kv_caches=[ListCache(), ListCache()])
