"""Tests for gpt2_book.attention (chapter notebooks/02_attention.ipynb).

Tolerances: float32 throughout; two implementations of the same attention agree to about 1e-7
in absolute terms on unit-scale inputs, so 1e-5 leaves room for other BLAS builds while still
catching any real difference (a missing scale, mask or transpose changes outputs by ~1e-1).
"""

import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2Config, GPTNeoXConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.gpt_neox import modeling_gpt_neox as neox

from gpt2_book.attention import CausalSelfAttention, manual_attention
from gpt2_book.rope import RotaryEmbedding

TOL = {"atol": 1e-5, "rtol": 1e-5}
B, T, C, NH = 3, 12, 32, 4


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, C, generator=g)  # (B, T, C)


def make_attention(
    rope: bool = False, head_dim: int | None = None, fast: bool = True
) -> CausalSelfAttention:
    """A seeded module: the same weights for every `fast`, so the two paths can be compared."""
    torch.manual_seed(0)
    hs = head_dim or C // NH
    rotary = RotaryEmbedding(hs) if rope else None
    attn = CausalSelfAttention(n_embd=C, n_head=NH, head_dim=head_dim, rope=rotary, fast=fast)
    return attn.eval()


class ListCache:
    """The smallest object with KVCache's `update`: it concatenates (the real one, in
    gpt2_book.generate, writes into buffers allocated once; test_generate.py tests that one)."""

    def __init__(self) -> None:
        self.k = self.v = None

    def update(self, k, v, start_pos):
        assert start_pos == (0 if self.k is None else self.k.size(2))
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def reference_attention(q, k, v):
    """Attention with an explicit loop over query positions: the definition, nothing fused."""
    out = torch.empty_like(q)
    for t in range(q.size(-2)):
        scores = q[..., t : t + 1, :] @ k[..., : t + 1, :].transpose(-2, -1)  # (B, nh, 1, t+1)
        weights = (scores / q.size(-1) ** 0.5).softmax(-1)
        out[..., t : t + 1, :] = weights @ v[..., : t + 1, :]
    return out


def test_manual_attention_matches_the_definition():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=g) for _ in range(3))
    out, weights = manual_attention(q, k, v)
    assert out.shape == (2, 3, 7, 5) and weights.shape == (2, 3, 7, 7)
    assert_close(out, reference_attention(q, k, v), **TOL)
    assert_close(weights.sum(-1), torch.ones(2, 3, 7))
    assert torch.all(weights.triu(1) == 0)


def test_manual_attention_equals_sdpa():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(manual_attention(q, k, v)[0], fast, **TOL)


@pytest.mark.parametrize("rope", [False, True], ids=["learned-pos", "rope"])
def test_fast_path_equals_manual_path(x, rope):
    fast = make_attention(rope=rope)(x)
    manual = make_attention(rope=rope, fast=False)(x)
    assert_close(fast, manual, **TOL)


@pytest.mark.parametrize("rope", [False, True], ids=["learned-pos", "rope"])
@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "manual"])
def test_causality(x, rope, fast):
    """Changing token t+1 and later leaves outputs at positions <= t unchanged."""
    attn = make_attention(rope=rope, fast=fast)
    t = 5
    x2 = x.clone()
    x2[:, t + 1 :] += torch.randn(B, T - t - 1, C)
    y, y2 = attn(x), attn(x2)
    assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-6, rtol=1e-6)
    assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-3  # the change does arrive


def test_rope_changes_the_result(x):
    """The rotation is really applied (a no-op rope would pass every other test)."""
    plain, rotary = make_attention(rope=False), make_attention(rope=True)
    assert (plain(x) - rotary(x)).abs().max() > 1e-3
    assert_close(plain(x)[:, 0], rotary(x)[:, 0], **TOL)  # position 0 is not rotated


def test_batch_rows_are_independent(x):
    attn = make_attention(rope=True)
    batched = attn(x)
    for b in range(B):
        assert_close(attn(x[b : b + 1]), batched[b : b + 1], **TOL)


def test_heads_are_independent(x):
    """Each head's output depends only on its own slices of c_attn (and c_proj's columns)."""
    attn = make_attention()
    hs = attn.head_dim
    with torch.no_grad():
        before = attn(x)
        w = attn.c_attn.weight.view(3, NH, hs, C)  # (q/k/v, head, hs, C)
        w[:, 1] += torch.randn(3, hs, C)  # change head 1 only
        attn.c_proj.weight[:, hs : 2 * hs] = 0.0  # and drop head 1 from the output
        after_a = attn(x)
        w[:, 1] += torch.randn(3, hs, C)  # change head 1 again
        after_b = attn(x)
    assert (before - after_a).abs().max() > 1e-3
    assert_close(after_a, after_b, **TOL)


@pytest.mark.parametrize("head_dim", [6, 16], ids=["narrow", "wide"])
def test_head_dim_independent_of_n_embd(x, head_dim):
    attn = make_attention(rope=True, head_dim=head_dim)
    assert attn.c_attn.weight.shape == (3 * NH * head_dim, C)
    assert attn.c_proj.weight.shape == (C, NH * head_dim)
    y = attn(x)
    assert y.shape == (B, T, C)
    assert_close(make_attention(rope=True, head_dim=head_dim, fast=False)(x), y, **TOL)


@pytest.mark.parametrize("rope", [False, True], ids=["learned-pos", "rope"])
def test_qkv_is_what_forward_attends_with(x, rope):
    """forward == c_proj(manual attention of qkv's tensors, heads side by side)."""
    attn = make_attention(rope=rope)
    q, k, v = attn.qkv(x)
    assert q.shape == k.shape == v.shape == (B, NH, T, C // NH)
    y, _ = manual_attention(q, k, v)  # (B, nh, T, hs)
    assert_close(attn(x), attn.c_proj(y.transpose(1, 2).reshape(B, T, C)), **TOL)
    q7, k7, v7 = attn.qkv(x, start_pos=7)
    assert_close(v7, v)  # values are never rotated
    assert rope == bool((q7 - q).abs().max() > 1e-3)  # queries are, at their positions


@pytest.mark.parametrize("rope", [False, True], ids=["learned-pos", "rope"])
@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "manual"])
def test_kv_cache_prefill_then_steps_equals_one_call(x, rope, fast):
    """Tokens fed as 5 + 1 + 3 + 1 + ... through a cache give the outputs of one call; this
    exercises the bottom-right mask (S > T, T > 1) and the single-query path (T == 1)."""
    attn = make_attention(rope=rope, fast=fast)
    cache, parts, t = ListCache(), [], 0
    for n in (5, 1, 3, 1, 2):
        parts.append(attn(x[:, t : t + n], start_pos=t, kv_cache=cache))
        t += n
    assert t == T
    assert_close(torch.cat(parts, dim=1), attn(x), **TOL)


def test_knobs_are_keyword_only():
    with pytest.raises(TypeError):
        CausalSelfAttention(C, NH)
    with pytest.raises(TypeError):
        make_attention()(torch.zeros(1, 2, C), 0)  # start_pos must be named


def test_parameter_names_and_count():
    attn = CausalSelfAttention(n_embd=768, n_head=12)
    names = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert names == {
        "c_attn.weight": (2304, 768),
        "c_attn.bias": (2304,),
        "c_proj.weight": (768, 768),
        "c_proj.bias": (768,),
    }
    assert sum(p.numel() for p in attn.parameters()) == 2_362_368


def test_shared_rope_is_not_in_state_dict():
    rope = RotaryEmbedding(8)
    a = CausalSelfAttention(n_embd=C, n_head=NH, rope=rope)
    b = CausalSelfAttention(n_embd=C, n_head=NH, rope=rope)
    assert a.rope is b.rope
    assert set(a.state_dict()) == {"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_matches_hugging_face_gpt2_attention(x, implementation):
    """Copy our weights into transformers' GPT2Attention (Conv1D stores W transposed)."""
    config = GPT2Config(n_embd=C, n_head=NH, n_positions=T, attn_pdrop=0.0, resid_pdrop=0.0)
    config._attn_implementation = implementation
    hf = GPT2Attention(config, layer_idx=0).eval()
    ours, manual = make_attention(), make_attention(fast=False)
    with torch.no_grad():
        hf.c_attn.weight.copy_(ours.c_attn.weight.T)
        hf.c_attn.bias.copy_(ours.c_attn.bias)
        hf.c_proj.weight.copy_(ours.c_proj.weight.T)
        hf.c_proj.bias.copy_(ours.c_proj.bias)
    mask = None  # sdpa: transformers infers a causal mask
    if implementation == "eager":  # eager applies only the mask it is given
        mask = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        expected = hf(x, attention_mask=mask)[0]
    assert_close(ours(x), expected, **TOL)
    assert_close(manual(x), expected, **TOL)


def test_rope_mode_matches_hugging_face_gpt_neox_attention(x):
    """GPT-NeoX rotates q and k with the same split-halves RoPE; its fused layer is head-major."""
    config = GPTNeoXConfig(
        hidden_size=C, num_attention_heads=NH, rotary_pct=1.0, rope_theta=10000.0
    )
    config._attn_implementation = "sdpa"  # with no mask given, it applies a causal one
    hf = neox.GPTNeoXAttention(config, layer_idx=0).eval()
    ours, manual = make_attention(rope=True), make_attention(rope=True, fast=False)
    hs = C // NH
    with torch.no_grad():  # ours: [q heads | k heads | v heads]; NeoX: [q_h, k_h, v_h] per head
        w = ours.c_attn.weight.view(3, NH, hs, C).transpose(0, 1).reshape(3 * C, C)
        hf.query_key_value.weight.copy_(w)
        hf.query_key_value.bias.copy_(ours.c_attn.bias.view(3, NH, hs).transpose(0, 1).flatten())
        hf.dense.weight.copy_(ours.c_proj.weight)
        hf.dense.bias.copy_(ours.c_proj.bias)
        cos_sin = neox.GPTNeoXRotaryEmbedding(config)(x, torch.arange(T)[None])
        expected = hf(x, attention_mask=None, position_embeddings=cos_sin)[0]
    assert_close(ours(x), expected, **TOL)
    assert_close(manual(x), expected, **TOL)


def test_dropout_only_in_training(x):
    torch.manual_seed(0)
    attn = CausalSelfAttention(n_embd=C, n_head=NH, dropout=0.5)
    attn.train()
    assert (attn(x) - attn(x)).abs().max() > 1e-3  # random masks differ between calls
    attn.eval()
    assert_close(attn(x), attn(x))


def test_gradients_flow(x):
    attn = make_attention(rope=True)
    attn(x).pow(2).mean().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_embd": 0, "n_head": 4}, "n_embd"),
        ({"n_embd": 32, "n_head": 0}, "n_head"),
        ({"n_embd": 32, "n_head": -2}, "n_head"),
        ({"n_embd": 30, "n_head": 4}, "head_dim"),
        ({"n_embd": 32, "n_head": 4, "head_dim": 0}, "head_dim"),
        ({"n_embd": 32, "n_head": 4, "dropout": 1.0}, "dropout"),
        ({"n_embd": 32, "n_head": 4, "dropout": -0.1}, "dropout"),
        ({"n_embd": 32, "n_head": 4, "rope": RotaryEmbedding(16)}, "rope"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CausalSelfAttention(**kwargs)
