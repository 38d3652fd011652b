"""Tests of gpt2_book.evaluate (chapter notebooks/11_experiments.ipynb) and its CLI command."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2_book.evaluate import (
    attention_weights,
    load_tokens,
    loss_per_position,
    ntk_rope_base,
    perplexity,
    rescale_rope,
    token_losses,
    train_steps,
    yarn_rope,
)
from gpt2_book.gpt import GPT


@pytest.fixture
def rope_model(seed, tiny_config):
    return GPT(dataclasses.replace(tiny_config, block_size=16)).eval()


@pytest.fixture
def learned_model(seed, tiny_config):
    return GPT(dataclasses.replace(tiny_config, block_size=16, pos_encoding="learned")).eval()


def test_loss_per_position_matches_cross_entropy_by_hand(rope_model):
    tokens = torch.randint(0, 65, (3 * 10 + 5,))  # three windows of 10, and a remainder
    losses = loss_per_position(rope_model, tokens, 10, batch_size=2)
    x = tokens[:30].view(3, 10)
    y = tokens[1:31].view(3, 10)
    logits = rope_model(x)[0]  # (3, 10, V)
    by_hand = torch.stack(
        [F.cross_entropy(logits[:, t], y[:, t]) for t in range(10)]  # mean over the windows
    )
    assert losses.shape == (10,)
    torch.testing.assert_close(losses, by_hand, rtol=1e-5, atol=1e-6)


def test_max_windows_uses_the_first_windows(rope_model):
    tokens = torch.randint(0, 65, (100,))
    first_two = loss_per_position(rope_model, tokens, 8, max_windows=2)
    torch.testing.assert_close(first_two, loss_per_position(rope_model, tokens[:17], 8))


def test_perplexity_is_exp_of_the_mean_loss():
    losses = torch.tensor([0.5, 1.0, 2.0, 2.5])
    assert math.isclose(perplexity(losses), math.exp(1.5), rel_tol=1e-6)
    assert math.isclose(perplexity(torch.full((7,), math.log(65))), 65, rel_tol=1e-5)


def test_learned_model_past_block_size_is_a_sliding_window(learned_model):
    W = learned_model.config.block_size
    x, y = torch.randint(0, 65, (2, 3 * W)), torch.randint(0, 65, (2, 3 * W))
    losses = token_losses(learned_model, x, y)  # window defaults to block_size
    assert losses.shape == (2, 3 * W)
    head = F.cross_entropy(learned_model(x[:, :W])[0].transpose(1, 2), y[:, :W], reduction="none")
    torch.testing.assert_close(losses[:, :W], head)
    for t in (W, W + 5, 3 * W - 1):  # the last W tokens up to t, evaluated on their own
        alone = learned_model(x[:, t - W + 1 : t + 1])[0][:, -1]  # (B, V)
        expected = F.cross_entropy(alone, y[:, t], reduction="none")
        torch.testing.assert_close(losses[:, t], expected, rtol=1e-5, atol=1e-6)


def test_window_on_a_rope_model_crops_too(rope_model):
    x, y = torch.randint(0, 65, (1, 20)), torch.randint(0, 65, (1, 20))
    full = token_losses(rope_model, x, y)
    cropped = token_losses(rope_model, x, y, window=5)
    torch.testing.assert_close(cropped[:, :5], full[:, :5])
    alone = F.cross_entropy(rope_model(x[:, 10:15])[0][:, -1], y[:, 14], reduction="none")
    torch.testing.assert_close(cropped[:, 14], alone, rtol=1e-5, atol=1e-6)


def test_loss_per_position_restores_the_mode(rope_model):
    rope_model.train()
    loss_per_position(rope_model, torch.randint(0, 65, (40,)), 8)
    assert rope_model.training


@pytest.mark.parametrize("context", [0, -3])
def test_bad_context_is_a_clear_error(rope_model, context):
    with pytest.raises(ValueError, match="context must be a positive number"):
        loss_per_position(rope_model, torch.randint(0, 65, (40,)), context)


def test_too_few_tokens_and_bad_window_are_clear_errors(rope_model):
    with pytest.raises(ValueError, match="too few for one window"):
        loss_per_position(rope_model, torch.randint(0, 65, (8,)), 8)
    with pytest.raises(ValueError, match="window must be a positive"):
        token_losses(rope_model, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4), 0)


def test_rescale_rope_with_scale_one_changes_nothing(rope_model):
    idx = torch.randint(0, 65, (2, 40))
    same = rescale_rope(rope_model)
    assert same.rope is not rope_model.rope
    assert all(block.attn.rope is same.rope for block in same.transformer.h)
    torch.testing.assert_close(same(idx)[0], rope_model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("change", [{"scale": 0.25}, {"base": 500_000.0}])
def test_rescale_rope_changes_logits_and_leaves_the_original(rope_model, change):
    idx = torch.randint(0, 65, (2, 40))
    before = rope_model(idx)[0]
    other = rescale_rope(rope_model, **change)
    assert not torch.allclose(other(idx)[0], before, atol=1e-4)
    torch.testing.assert_close(rope_model(idx)[0], before, rtol=0, atol=0)
    assert rope_model.rope.scale == 1.0 and rope_model.rope.base == 10000.0
    assert other.config.rope_base == change.get("base", 10000.0)


def test_rescale_rope_scale_is_position_interpolation(rope_model):
    # With scale 1/2, the rotation at position 2m is the original's at position m.
    half = rescale_rope(rope_model, scale=0.5)
    q = torch.randn(1, 1, 8, rope_model.config.head_size)
    torch.testing.assert_close(half.rope(q)[:, :, ::2], rope_model.rope(q[:, :, ::2]))


def test_rescale_rope_refuses_a_learned_model(learned_model):
    with pytest.raises(ValueError, match="pos_encoding='rope'"):
        rescale_rope(learned_model, scale=0.5)


def test_ntk_base_slows_the_slowest_pair_by_the_factor():
    hs, factor = 16, 8.0
    new = ntk_rope_base(10000.0, hs, factor)
    slowest = (hs - 2) / hs  # exponent of the last pair: theta = base ** -slowest
    assert math.isclose(10000.0**-slowest / new**-slowest, factor, rel_tol=1e-9)


def test_attention_weights_reproduce_the_attention_output(rope_model):
    idx = torch.randint(0, 65, (2, 12))
    weights = attention_weights(rope_model, idx, layer=1)  # (B, nh, T, T)
    assert weights.shape == (2, rope_model.config.n_head, 12, 12)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, rope_model.config.n_head, 12))
    assert weights.triu(1).eq(0).all()
    attn, seen = rope_model.transformer.h[1].attn, {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    rope_model(idx)
    handle.remove()
    B, T, C = seen["x"].shape
    v = attn.qkv(seen["x"])[2]  # (B, nh, T, hs)
    y = attn.c_proj((weights @ v).transpose(1, 2).reshape(B, T, -1))  # (B, T, C)
    torch.testing.assert_close(y, seen["y"], rtol=1e-5, atol=1e-5)


def test_load_tokens_round_trip(tmp_path):
    ids = np.array([0, 5, 65535, 7], dtype=np.uint16)
    ids.tofile(tmp_path / "val.bin")
    tokens = load_tokens(tmp_path / "val.bin")
    assert tokens.dtype == torch.int64 and tokens.tolist() == [0, 5, 65535, 7]
    with pytest.raises(ValueError, match="no such token file"):
        load_tokens(tmp_path / "missing.bin")


# The command line, in-process through `main(argv)` (test_cli.py runs it in a subprocess), on a
# checkpoint trained for 2 steps.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from gpt2_book.data import prepare, shakespeare_path
    from gpt2_book.gpt import GPTConfig
    from gpt2_book.train import TrainConfig
    from gpt2_book.trainer import train

    folder = tmp_path_factory.mktemp("evaluate")
    (folder / "small.txt").write_text(shakespeare_path().read_text()[:5_000])
    prepare(folder / "small.txt", folder / "data", block_size=64)
    model = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)
    config = TrainConfig(model=model, batch_size=2, max_iters=2, eval_iters=1, device="cpu")
    train(config, folder / "data", folder / "run", progress=False)
    return folder


def test_cli_evaluate_on_a_token_file_and_on_text(checkpoint, capsys):
    from gpt2_book.__main__ import main

    args = ["evaluate", "--checkpoint", str(checkpoint / "run"), "--context", "32", "--device",
            "cpu"]  # fmt: skip
    assert main([*args, "--input", str(checkpoint / "data/val.bin")]) == 0
    out = capsys.readouterr().out
    assert "15 windows of 32 tokens" in out  # 500 val tokens
    assert "perplexity" in out and "positions >= 16" in out
    text = [*args, "--input", str(checkpoint / "small.txt"), "--max-windows", "3"]
    assert main([*text, "--rope-scale", "0.5"]) == 0
    assert "3 windows of 32 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("context", ["0", "-1"])
def test_cli_evaluate_bad_context_is_a_clear_error(checkpoint, capsys, context):
    from gpt2_book.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(checkpoint / "run"), "--input",
              str(checkpoint / "data/val.bin"), "--context", context])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--context: must be" in capsys.readouterr().err


# --- YaRN ---------------------------------------------------------------------------------------


def test_yarn_with_factor_one_is_rope_itself(rope_model):
    idx = torch.randint(0, 65, (2, 40))
    same = yarn_rope(rope_model, factor=1.0, train_len=16)
    torch.testing.assert_close(same(idx)[0], rope_model(idx)[0])
    assert all(block.attn.rope is same.rope for block in same.transformer.h)


def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones(rope_model):
    hs, train_len, factor = rope_model.config.head_size, 16, 4.0
    theta = 10000.0 ** -(torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    turns = train_len * theta / (2 * math.pi)
    new = yarn_rope(rope_model, factor=factor, train_len=train_len, alpha=1.0, beta=2.0).rope
    slowdown = theta / new.theta
    assert torch.allclose(slowdown[turns > 2.0], torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(slowdown[turns < 1.0], torch.tensor(factor, dtype=torch.float64))
    assert math.isclose(new.gain, 0.1 * math.log(factor) + 1)
    # the tables grow from the YaRN frequencies too, not from the base
    q = torch.randn(1, 1, 3 * new.cos.shape[0], hs)
    rotated = new(q)
    angles = (q.shape[2] - 1) * new.theta  # the last position's angle per pair
    expected_cos = torch.cat([angles.cos(), angles.cos()]).float() * new.gain
    torch.testing.assert_close(new.cos[q.shape[2] - 1], expected_cos)
    assert rotated.shape == q.shape


def test_yarn_refuses_learned_models_and_bad_factors(rope_model, learned_model):
    with pytest.raises(ValueError, match="yarn_rope needs a RoPE model"):
        yarn_rope(learned_model, factor=2.0, train_len=16)
    with pytest.raises(ValueError, match="factor >= 1"):
        yarn_rope(rope_model, factor=0.5, train_len=16)


# --- the training loop --------------------------------------------------------------------------


def test_train_steps_lowers_the_loss_and_leaves_eval_mode(rope_model):
    x = torch.randint(0, 65, (4, 16))
    batches = iter([(x, x.roll(-1, dims=1))] * 30)  # one batch, again and again
    losses = train_steps(rope_model, batches, steps=30, learning_rate=3e-3, warmup_iters=5)
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0
    assert not rope_model.training
