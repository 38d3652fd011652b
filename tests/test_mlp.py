"""Tests for gpt2_book.mlp (chapter notebooks/03_mlp.ipynb).

Tolerances: float32; the module and the hand-written formula do the same matmuls, so they agree
to ~1e-7; 1e-5 allows other BLAS builds. Using the exact (erf) GELU instead of GPT-2's tanh
approximation changes outputs by ~1e-4 at these scales, which the tight test below catches.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from gpt2_book.mlp import MLP

TOL = {"atol": 1e-6, "rtol": 1e-5}
B, T, C = 3, 7, 16


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 3.0 * torch.randn(B, T, C, generator=g)  # (B, T, C), wide enough to test the GELU tails


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(n_embd=C).eval()


def formula(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's MLP written out: tanh-approximated GELU between two affine maps."""
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    return h @ mlp.c_proj.weight.T + mlp.c_proj.bias


def test_equals_the_formula(mlp, x):
    assert_close(mlp(x), formula(mlp, x), **TOL)


def test_uses_the_tanh_approximation_not_exact_gelu(mlp, x):
    exact = mlp.c_proj(torch.nn.functional.gelu(mlp.c_fc(x)))  # erf GELU
    assert (mlp(x) - exact).abs().max() > 1e-5 > (mlp(x) - formula(mlp, x)).abs().max()


def test_exact_gelu_is_the_erf_formula(mlp, x):
    exact = MLP(n_embd=mlp.c_fc.in_features, gelu="exact")
    exact.load_state_dict(mlp.state_dict())
    h = mlp.c_fc(x)
    by_hand = mlp.c_proj(0.5 * h * (1 + torch.erf(h / math.sqrt(2))))
    assert_close(exact(x), by_hand, **TOL)
    assert 1e-5 < (exact(x) - mlp(x)).abs().max() < 1e-2  # close to the tanh one, not equal


def test_shapes_and_names():
    mlp = MLP(n_embd=768)
    shapes = {n: tuple(p.shape) for n, p in mlp.named_parameters()}
    assert shapes == {
        "c_fc.weight": (3072, 768),
        "c_fc.bias": (3072,),
        "c_proj.weight": (768, 3072),
        "c_proj.bias": (768,),
    }
    assert sum(p.numel() for p in mlp.parameters()) == 4_722_432


def test_mlp_ratio_and_no_bias():
    mlp = MLP(n_embd=10, mlp_ratio=2.5, bias=False)
    assert mlp.c_fc.weight.shape == (25, 10) and mlp.c_proj.weight.shape == (10, 25)
    assert mlp.c_fc.bias is None and mlp.c_proj.bias is None
    assert mlp(torch.randn(2, 3, 10)).shape == (2, 3, 10)


def test_per_token_permutation_equivariance(mlp, x):
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(1))
    assert_close(mlp(x[:, perm]), mlp(x)[:, perm], **TOL)


def test_per_token_alone_equals_in_context(mlp, x):
    y = mlp(x)
    for b, t in [(0, 0), (1, 3), (2, T - 1)]:
        assert_close(mlp(x[b, t]), y[b, t], **TOL)  # a single (C,) vector works too


def test_dropout_only_in_training(x):
    torch.manual_seed(0)
    mlp = MLP(n_embd=C, dropout=0.5)
    assert (mlp(x) - mlp(x)).abs().max() > 1e-3
    mlp.eval()
    assert_close(mlp(x), mlp(x))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_embd": 0}, "n_embd"),
        ({"n_embd": -4}, "n_embd"),
        ({"n_embd": 8, "mlp_ratio": 0.0}, "mlp_ratio"),
        ({"n_embd": 8, "mlp_ratio": 0.1}, "mlp_ratio"),
        ({"n_embd": 8, "dropout": 1.5}, "dropout"),
        ({"n_embd": 8, "gelu": "none"}, "gelu"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MLP(**kwargs)
