"""Fixtures shared by the test files: a seeded RNG and a tiny model configuration.

The tiny configuration is minGPT's "gpt-nano" scale (3 layers, 3 heads, 48 channels, a 65-symbol
vocabulary, 64 positions), so that whole-model tests take milliseconds on a CPU.
"""

import pytest
import torch


@pytest.fixture
def seed() -> int:
    """Seed PyTorch's global generator, so a test's random tensors are the same every run."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def tiny_config():
    """A fresh `GPTConfig.from_preset("tiny")` (rotary positions); override fields with
    `dataclasses.replace(tiny_config, ...)`."""
    from gpt2_book.gpt import GPTConfig  # imported here so other modules' tests never need it

    return GPTConfig.from_preset("tiny")
