"""Tests for gpt2_book.block (chapter notebooks/04_block.ipynb).

Tolerances: float32; the block and the formula below run the same sub-modules in the same order,
so they agree to ~1e-7; 1e-5 leaves room for other BLAS builds.
"""

import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from gpt2_book.block import Block
from gpt2_book.rope import RotaryEmbedding

TOL = {"atol": 1e-5, "rtol": 1e-5}
B, T, C, NH = 2, 10, 32, 4


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, C, generator=g)  # (B, T, C)


def make_block(rope: bool = False, **kwargs) -> Block:
    torch.manual_seed(0)
    block = Block(n_embd=C, n_head=NH, rope=RotaryEmbedding(C // NH) if rope else None, **kwargs)
    with torch.no_grad():  # non-trivial norms, so that a swapped ln_1/ln_2 would show
        for ln in (block.ln_1, block.ln_2):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_(0.0, 0.1)
    return block.eval()


def layer_norm(x, ln):
    """LayerNorm by hand: normalise each token vector, then per-channel gain and bias."""
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


@pytest.mark.parametrize("rope", [False, True], ids=["learned-pos", "rope"])
def test_equals_the_two_line_formula(x, rope):
    block = make_block(rope=rope)
    h = x + block.attn(layer_norm(x, block.ln_1))
    expected = h + block.mlp(layer_norm(h, block.ln_2))
    assert_close(block(x), expected, **TOL)


@pytest.mark.parametrize("rope", [False, True], ids=["learned-pos", "rope"])
def test_causality(x, rope):
    block = make_block(rope=rope)
    t = 4
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(B, T - t - 1, C)
    y, y2 = block(x), block(x2)
    assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-6, rtol=1e-6)
    assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-3


def test_matches_hugging_face_gpt2_block(x):
    """Same weights in transformers' GPT2Block (Conv1D weights are the transposes)."""
    config = GPT2Config(n_embd=C, n_head=NH, n_positions=T, resid_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "sdpa"  # with no mask given, it applies a causal one
    hf = GPT2Block(config, layer_idx=0).eval()
    ours = make_block()
    ours_sd = ours.state_dict()
    conv1d = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
    hf_sd = {k: v.T if k in conv1d else v for k, v in ours_sd.items()}
    hf.load_state_dict(hf_sd)  # strict: the names match one to one
    with torch.no_grad():
        expected = hf(x)  # (B, T, C)
    assert_close(ours(x), expected, **TOL)


def test_parameter_names_match_gpt2_checkpoint():
    names = [n for n, _ in Block(n_embd=768, n_head=12).named_parameters()]
    assert names == [
        "ln_1.weight",
        "ln_1.bias",
        "attn.c_attn.weight",
        "attn.c_attn.bias",
        "attn.c_proj.weight",
        "attn.c_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    assert (
        sum(p.numel() for p in Block(n_embd=768, n_head=12).parameters()) == 12 * 768**2 + 13 * 768
    )


def test_arguments_reach_the_sub_layers():
    rope = RotaryEmbedding(10)
    block = Block(
        n_embd=24,
        n_head=3,
        head_dim=10,
        mlp_ratio=2.0,
        bias=False,
        dropout=0.25,
        rope=rope,
        fast=False,
    )
    assert block.attn.head_dim == 10 and block.attn.rope is rope and not block.attn.fast
    assert block.attn.c_attn.weight.shape == (90, 24) and block.attn.c_attn.bias is None
    assert block.mlp.c_fc.weight.shape == (48, 24) and block.mlp.c_fc.bias is None
    assert block.ln_1.bias is None and block.ln_2.bias is None
    assert block.attn.attn_dropout.p == block.mlp.dropout.p == 0.25
    assert block.eval()(torch.randn(2, 5, 24)).shape == (2, 5, 24)


@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "manual"])
def test_kv_cache_reaches_the_attention(x, fast):
    """A block fed 6 tokens, then 4 one at a time through a cache, equals one call on all 10."""

    class ListCache:  # the smallest object with KVCache's update
        k = v = None

        def update(self, k, v, start_pos):
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            return self.k, self.v

    block, cache = make_block(rope=True, fast=fast), ListCache()
    parts = [block(x[:, :6], kv_cache=cache)]
    parts += [block(x[:, t : t + 1], start_pos=t, kv_cache=cache) for t in range(6, T)]
    assert_close(torch.cat(parts, dim=1), block(x), **TOL)


def test_residual_lets_gradient_reach_the_input(x):
    """With zeroed output projections, the block is the identity and its Jacobian is I."""
    block = make_block()
    with torch.no_grad():
        for linear in (block.attn.c_proj, block.mlp.c_proj):
            linear.weight.zero_()
            linear.bias.zero_()
    x = x.clone().requires_grad_(True)
    y = block(x)
    assert_close(y, x)
    y.sum().backward()
    assert_close(x.grad, torch.ones_like(x))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_embd": 0, "n_head": 4}, "n_embd"),
        ({"n_embd": 32, "n_head": 0}, "n_head"),
        ({"n_embd": 30, "n_head": 4}, "head_dim"),
        ({"n_embd": 32, "n_head": 4, "mlp_ratio": -1.0}, "mlp_ratio"),
        ({"n_embd": 32, "n_head": 4, "dropout": 2.0}, "dropout"),
        ({"n_embd": 32, "n_head": 4, "rope": RotaryEmbedding(4)}, "rope"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Block(**kwargs)
