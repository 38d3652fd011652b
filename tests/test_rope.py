"""Tests for gpt2_book.rope (chapter notebooks/01_rope.ipynb)."""

import pytest
import torch
from torch.testing import assert_close
from transformers.models.llama import modeling_llama as llama

from gpt2_book.rope import RotaryEmbedding

HS = 16


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 20, HS, generator=g)  # (B, nh, T, hs)


def complex_reference(x: torch.Tensor, start_pos: int = 0, base: float = 10000.0) -> torch.Tensor:
    """RoPE as complex multiplication, split-halves pairing, in float64."""
    T, d = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    phase = torch.arange(start_pos, start_pos + T, dtype=torch.float64)[:, None] * freqs
    z = torch.complex(*x.double().chunk(2, dim=-1)) * torch.polar(torch.ones_like(phase), phase)
    return torch.cat([z.real, z.imag], dim=-1)


def test_matches_complex_reference(x):
    assert_close(RotaryEmbedding(HS)(x).double(), complex_reference(x), atol=1e-6, rtol=1e-6)


def test_matches_complex_reference_at_large_positions(x):
    out = RotaryEmbedding(HS, max_seq_len=8)(x, start_pos=100_000)
    assert_close(out.double(), complex_reference(x, start_pos=100_000), atol=1e-5, rtol=1e-5)


def test_matches_hugging_face_llama_rotary(x):
    """Llama in transformers uses the same split-halves convention and frequencies."""
    config = llama.LlamaConfig(hidden_size=HS * 3, num_attention_heads=3, rope_theta=10000.0)
    hf_rope = llama.LlamaRotaryEmbedding(config)
    positions = torch.arange(x.shape[-2])[None].expand(x.shape[0], -1)  # (B, T)
    cos, sin = hf_rope(x, positions)
    q_ref, k_ref = llama.apply_rotary_pos_emb(x, x.flip(-1), cos, sin)
    rope = RotaryEmbedding(HS)
    assert_close(rope(x), q_ref, atol=1e-5, rtol=1e-5)
    assert_close(rope(x.flip(-1)), k_ref, atol=1e-5, rtol=1e-5)


def test_preserves_norm(x):
    assert_close(RotaryEmbedding(HS)(x).norm(dim=-1), x.norm(dim=-1))


def test_position_zero_is_identity(x):
    assert_close(RotaryEmbedding(HS)(x[..., :1, :]), x[..., :1, :])


def test_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(HS)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 1, HS, generator=g)

    def score(m: int, n: int) -> torch.Tensor:
        return (rope(q, start_pos=m) * rope(k, start_pos=n)).sum()

    for offset in (0, 1, 7, 50):
        reference = score(offset, 0)
        for shift in (3, 100, 2000):
            assert_close(score(offset + shift, shift), reference, atol=1e-4, rtol=1e-4)
    # and it does depend on the offset: otherwise the test above would prove nothing
    assert not torch.allclose(score(1, 0), score(5, 0), atol=1e-3)


def test_start_pos_equals_slicing_a_longer_run(x):
    rope = RotaryEmbedding(HS)
    full = rope(x)
    assert_close(rope(x[..., 5:9, :], start_pos=5), full[..., 5:9, :])
    assert_close(rope(x[..., 19:, :], start_pos=19), full[..., 19:, :])


def test_cache_grows_on_demand_and_matches_a_big_cache(x):
    small, big = RotaryEmbedding(HS, max_seq_len=4), RotaryEmbedding(HS, max_seq_len=4096)
    out_small = small(x, start_pos=1000)  # positions 1000..1019, far past 4
    assert small.cos.shape[0] >= 1020
    assert_close(out_small, big(x, start_pos=1000))
    # no silent wrap-around: position 1000 is not position 1000 mod 4
    assert not torch.allclose(out_small[..., :1, :], small(x[..., :1, :], start_pos=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keeps_input_dtype(x, dtype):
    out = RotaryEmbedding(HS)(x.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    tol = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    assert_close(out.float(), complex_reference(x).float(), atol=tol * 4, rtol=tol)


def test_tables_are_not_saved_in_checkpoints():
    rope = RotaryEmbedding(HS)
    assert rope.state_dict() == {}
    assert {name for name, _ in rope.named_buffers()} == {"cos", "sin"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"head_dim": 15}, "head_dim"),
        ({"head_dim": 0}, "head_dim"),
        ({"head_dim": 8, "base": 1.0}, "base"),
        ({"head_dim": 8, "max_seq_len": 0}, "max_seq_len"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RotaryEmbedding(**kwargs)


def test_bad_inputs_raise_clear_errors(x):
    rope = RotaryEmbedding(HS)
    with pytest.raises(ValueError, match="head_dim"):
        rope(x[..., :8])
    with pytest.raises(ValueError, match="start_pos"):
        rope(x, start_pos=-1)


def test_scale_interpolates_positions(x):
    squeezed, plain = RotaryEmbedding(HS, scale=0.25), RotaryEmbedding(HS)
    assert_close(squeezed(x[..., :1, :], start_pos=40), plain(x[..., :1, :], start_pos=10))
    with pytest.raises(ValueError, match="scale"):
        RotaryEmbedding(HS, scale=0.0)
