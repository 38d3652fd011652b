"""Fixtures shared by every test file.

- `seed`: seeds PyTorch's global generator.
- `tiny_config`: minGPT's "gpt-nano" scale (3 layers, 3 heads, 48 channels, a 65-symbol vocabulary,
  64 positions), so whole-model tests take milliseconds on a CPU.
- `_one_thread` (automatic): every test runs PyTorch on one CPU thread. Tiny tensors gain nothing
  from more threads and lose a lot to their start-up and to contention when several test runs
  share a machine; with it, `test_generate.py` and `test_gpt.py` fell from 116 s to 21 s.

Tests that take seconds rather than milliseconds are marked `@pytest.mark.slow`; `make quick`
skips them, `make test` runs everything.

A shell started in the background (`make test &`, `nohup`) hands its programs SIGINT ignored,
and their children inherit that. The tests of Ctrl-C send SIGINT to a run and expect Python's
usual handler, so the session restores it (children then start with the default again).
"""

import signal
from collections.abc import Iterator

import pytest
import torch

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run the test on one PyTorch thread, then restore the previous setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
