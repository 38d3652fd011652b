"""Helpers shared by the training tests (test_train, test_checkpoint, test_trainer,
test_distributed): a gpt-nano-sized run and a small slice of the shipped corpus."""

from pathlib import Path

import torch

from gpt2_book.checkpoint import load_checkpoint
from gpt2_book.data import prepare, shakespeare_path
from gpt2_book.train import TrainConfig

# A gpt-nano-sized run: a handful of steps takes well under a second.
TINY = dict(
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=16,
    batch_size=4,
    max_iters=6,
    lr_decay_iters=6,
    warmup_iters=2,
    learning_rate=1e-2,
    min_lr=1e-3,
    eval_interval=3,
    eval_iters=2,
    device="cpu",
)


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig.from_preset("shakespeare-char-cpu", **{**TINY, **overrides})


def prepare_slice(folder: Path, start: int = 0, n: int = 20_000) -> Path:
    """Characters [start, start + n) of the shipped corpus, prepared char-level in folder/char."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "input.txt"
    text.write_text(shakespeare_path().read_text()[start : start + n])
    prepare(text, folder / "char", tokenizer="char", block_size=16)
    return folder / "char"


def weights(out_dir: Path) -> dict:
    return load_checkpoint(out_dir)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
