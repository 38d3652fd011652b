"""Tests of gpt2_book.train (chapter notebooks/07_training.ipynb): the configuration, the
learning-rate schedule, the optimizer, one training step and the loss estimate."""

import dataclasses
import math

import pytest
import torch
from _training import prepare_slice

from gpt2_book.data import Batches
from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.train import (
    PRESET_NAMES,
    TrainConfig,
    configure_optimizer,
    estimate_loss,
    fixed_batches,
    get_lr,
    train_step,
)

DELETE = object()  # a test's way to remove an entry


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_slice(tmp_path_factory.mktemp("data"))


@pytest.fixture
def nano(seed) -> GPT:
    return GPT(GPTConfig.from_preset("tiny", vocab_size=68, n_layer=1, block_size=16))


# ---- configuration -------------------------------------------------------------------------


def test_presets_exist_and_validate():
    assert set(PRESET_NAMES) == {
        "shakespeare-char-cpu",
        "shakespeare-char",
        "gpt2-small",
        "gpt2-finetune",
    }
    cpu = TrainConfig.from_preset("shakespeare-char-cpu")
    m = cpu.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias) == (4, 4, 128, 64, False)
    assert (cpu.batch_size, cpu.learning_rate, cpu.min_lr, cpu.beta2) == (12, 1e-3, 1e-4, 0.99)
    assert (cpu.max_iters, cpu.lr_decay_iters, m.dropout) == (2000, 2000, 0.0)
    assert TrainConfig() == cpu  # the defaults are this preset
    gpu = TrainConfig.from_preset("shakespeare-char").model
    shape = (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size, gpu.dropout)
    assert shape == (6, 6, 384, 256, 0.2)
    tune = TrainConfig.from_preset("gpt2-finetune").model  # OpenAI's GPT-2 small, shorter windows
    gpt2 = GPTConfig.from_preset("gpt2", pos_encoding="learned")
    assert dataclasses.replace(tune, block_size=1024, dropout=0.0) == gpt2


def test_gpt2_small_preset_has_124M_parameters():
    config = TrainConfig.from_preset("gpt2-small").model
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = GPT(config)
    n = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    # OpenAI's checkpoint has 124,439,808; the preset trains without biases (nanoGPT's choice):
    # per layer c_attn 3C + attn c_proj C + c_fc 4C + mlp c_proj C + ln_1 C + ln_2 C, plus ln_f.
    C, L = 768, 12
    assert n == 124_439_808 - (L * 11 * C + C)


def test_overrides_route_model_fields_into_the_model_config():
    c = TrainConfig.from_preset("shakespeare-char-cpu", n_layer=2, dropout=0.1, max_iters=7)
    assert (c.model.n_layer, c.model.dropout, c.max_iters) == (2, 0.1, 7)
    assert not hasattr(c, "n_layer")  # one place for each setting
    own = GPTConfig.from_preset("tiny")
    c = TrainConfig.from_preset("gpt2-small", model=own, n_embd=96)  # a whole model, then a field
    assert c.model == dataclasses.replace(own, n_embd=96)
    assert c.replace(batch_size=3).batch_size == 3 and c.replace(n_head=4).model.n_head == 4
    assert TrainConfig.from_dict(dataclasses.asdict(c)) == c  # how checkpoints read it back


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="no field 'layers'|a field 'layers'"):
        TrainConfig.from_preset("shakespeare-char-cpu", layers=2)


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("max_iters", 2.5),
        ("eval_iters", True),  # a bool is not a count
        ("min_lr", 1.0),
        ("learning_rate", math.inf),
        ("learning_rate", math.nan),
        ("warmup_iters", 10**6),
        ("beta2", 1.0),
        ("grad_clip", -1.0),
        ("dtype", "float8"),
        ("device", 7),
        ("seed", -1),
        ("compile", "yes"),
        ("model", {"n_layer": 2}),
    ],
)
def test_invalid_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} = "):
        TrainConfig(**{field: value})


def test_model_rules_are_checked_once_by_gpt_config():
    with pytest.raises(ValueError, match=r"GPTConfig\.n_embd"):
        TrainConfig.from_preset("shakespeare-char-cpu", n_head=3)  # 128 is not divisible by 3


def test_lr_schedule_warmup_cosine_floor():
    c = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, c) == pytest.approx(0.1)  # linear warmup ...
    assert get_lr(4, c) == pytest.approx(0.5)
    assert get_lr(9, c) == pytest.approx(1.0)  # ... reaching the peak
    assert get_lr(60, c) == pytest.approx(0.55)  # cosine: half way down at half the decay
    assert get_lr(35, c) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert get_lr(110, c) == get_lr(10_000, c) == pytest.approx(0.1)  # the floor
    lrs = [get_lr(i, c) for i in range(9, 200)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


# ---- optimizer, step, loss estimate ---------------------------------------------------------


def test_optimizer_decays_matrices_only(nano):
    optimizer = configure_optimizer(nano, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    decayed, plain = optimizer.param_groups
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(
        p.dim() < 2 for p in plain["params"]
    )
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in nano.parameters())  # each exactly once
    assert decayed["betas"] == (0.9, 0.99) and decayed["lr"] == 1e-3
    with pytest.raises(TypeError):
        configure_optimizer(nano, 1e-3)  # keyword-only


def test_fused_optimizer_updates_like_the_plain_for_loop(nano):
    """configure_optimizer's fused CPU kernel against PyTorch's reference AdamW (one tensor at a
    time, in Python): the same weights after a few steps with the same gradients."""
    reference = GPT(nano.config)
    reference.load_state_dict(nano.state_dict())
    fused = configure_optimizer(nano, learning_rate=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"]  # the CPU gets the one-pass kernel
    groups = [
        {"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    plain = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for _ in range(3):
        for p, q in zip(nano.parameters(), reference.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(nano.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_accumulated_micro_batches_equal_one_big_batch(nano, data_dir):
    """k micro-batches of B windows, each loss divided by k, give the gradient of one batch of
    kB windows; with SGD at lr=1 the step is the gradient itself."""
    x, y = next(Batches(data_dir, "train", 8, 16, seed=3))  # (8, 16) each
    twin = GPT(nano.config)
    twin.load_state_dict(nano.state_dict())
    big, small = iter([(x, y)]), iter([(x[:4], y[:4]), (x[4:], y[4:])])
    loss_big, _ = train_step(nano, torch.optim.SGD(nano.parameters()), big, lr=1.0, grad_clip=0)
    loss_acc, _ = train_step(
        twin, torch.optim.SGD(twin.parameters()), small, lr=1.0, accum_steps=2, grad_clip=0
    )
    assert loss_acc == pytest.approx(loss_big, abs=1e-6)
    for a, b in zip(nano.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_clips_and_overfits_one_batch(nano, data_dir):
    batch = next(Batches(data_dir, "train", 4, 16, seed=0))
    optimizer = configure_optimizer(nano, learning_rate=3e-3)
    for p in nano.parameters():
        p.grad = torch.full_like(p, 9.0)  # a stale gradient must not leak into the step
    first, norm = train_step(nano, optimizer, iter([batch]), lr=3e-3, grad_clip=0.5)
    assert norm > 0.5 and all(p.grad is None for p in nano.parameters())
    for _ in range(40):
        last, _ = train_step(nano, optimizer, iter([batch]), lr=3e-3, grad_clip=0.5)
    assert last < first - 1.0  # it memorises one batch


def test_estimate_loss_is_a_fixed_number_and_restores_the_mode(nano, data_dir):
    batches = fixed_batches(data_dir, "val", n=3, batch_size=2, block_size=16, seed=5)
    again = fixed_batches(data_dir, "val", n=3, batch_size=2, block_size=16, seed=5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    nano.train()
    loss = estimate_loss(nano, batches)
    assert nano.training  # back in training mode
    by_hand = sum(nano.eval()(x, y)[1].item() for x, y in batches) / 3
    assert loss == pytest.approx(by_hand, rel=1e-6)
    assert loss == pytest.approx(math.log(68), abs=0.3)  # about ln V at init


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(extra=1), "unknown field 'extra'"),
        (dict(max_iters=DELETE), "missing field 'max_iters'"),
        (dict(max_iters="9"), r"TrainConfig\.max_iters = '9'"),
        (dict(model=[1]), "holding a 'model' dict"),
        (dict(model={"n_layers": 2}), "n_layers"),
    ],
)
def test_saved_settings_that_do_not_fit_are_named(change, message):
    settings = {**dataclasses.asdict(TrainConfig()), **change}
    settings = {k: v for k, v in settings.items() if v is not DELETE}
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(settings)
