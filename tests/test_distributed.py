"""Tests of gpt2_book.distributed (chapter notebooks/08_training_for_real.ipynb): a single
process, and two CPU processes under torchrun (gloo) against one process."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training import assert_same_weights, prepare_slice, weights

import gpt2_book.runstate as runstate
from gpt2_book.checkpoint import load_checkpoint, load_model
from gpt2_book.data import Batches, read_meta
from gpt2_book.distributed import (
    World,
    gather,
    init_distributed,
    no_sync,
    stop_on_signals,
    sum_over_ranks,
)
from gpt2_book.gpt import GPT
from gpt2_book.train import TrainConfig, estimate_loss, fixed_batches
from gpt2_book.trainer import read_metrics, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_slice(tmp_path_factory.mktemp("data"))


def test_one_process_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world, device = init_distributed(torch.device("cpu"))
    assert world == World() and world.master and device == torch.device("cpu")
    value = torch.tensor([1.0, 2.0])
    assert torch.equal(sum_over_ranks(value, world), value) and gather("x", world) == ["x"]
    with no_sync(torch.nn.Linear(2, 2), skip=True):  # not DDP: nothing to skip
        pass
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed(torch.device("cpu"))


def test_signals_only_set_a_flag_while_inside():
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # ... a Ctrl-C after it neither
            os.kill(os.getpid(), signal.SIGINT)  # but a second Ctrl-C stops at once
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---- two processes under torchrun ------------------------------------------------------------

DDP_RUN = dict(
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=16,
    batch_size=2,
    grad_accum_steps=4,
    max_iters=3,
    eval_iters=2,
    eval_interval=2,
    warmup_iters=1,
    lr_decay_iters=3,
    learning_rate=1e-2,
    min_lr=1e-3,
    device="cpu",
)

WORKER = """
import sys
from gpt2_book.train import TrainConfig
from gpt2_book.trainer import train
overrides = eval(sys.argv[3])  # a dict literal written by the test
config = TrainConfig.from_preset("shakespeare-char-cpu", **overrides)
train(config, sys.argv[1], sys.argv[2], resume="--resume" in sys.argv, progress=False)
"""


def torchrun(tmp_path: Path, data_dir: Path, out_dir: Path, *extra: str, **overrides) -> None:
    """`train` in 2 CPU processes (gloo) started by torchrun, with DDP_RUN's settings."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    settings = repr({**DDP_RUN, **overrides})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(data_dir),
        str(out_dir),
        settings,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process(data_dir, tmp_path, monkeypatch):
    """torchrun, gloo, 2 CPU processes x 2 micro-batches == 1 process x 4 micro-batches that
    sees the same windows (rank 0's, rank 1's, rank 0's, ...)."""
    torchrun(tmp_path, data_dir, tmp_path / "ddp")
    assert len(load_checkpoint(tmp_path / "ddp")["ranks"]) == 2  # each rank's sampler state

    class Interleaved:  # one process drawing the windows both ranks drew, in turn
        def __init__(self, data_dir, split, batch_size, block_size, device, seed=0, *ignored):
            self.ranks = [
                Batches(data_dir, split, batch_size, block_size, device, seed, rank, 2)
                for rank in (0, 1)
            ]
            self.i = 0

        def __next__(self):
            self.i += 1
            return next(self.ranks[(self.i - 1) % 2])

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    monkeypatch.setattr(runstate, "Batches", Interleaved)
    config = TrainConfig.from_preset("shakespeare-char-cpu", **DDP_RUN)
    train(config, data_dir, tmp_path / "single", progress=False)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    torch.manual_seed(config.seed)
    vocab_size = read_meta(data_dir)["vocab_size"]
    init = GPT(config.replace(vocab_size=vocab_size).model).state_dict()
    assert not torch.equal(a["lm_head.weight"], init["lm_head.weight"])  # it did train
    # The two processes each evaluated half of the fixed batches and added up the sums.
    model, _ = load_model(tmp_path / "ddp")
    val = fixed_batches(
        data_dir,
        "val",
        n=config.eval_iters,
        batch_size=config.batch_size,
        block_size=16,
        seed=config.seed + 10_000,
    )
    ddp_val = read_metrics(tmp_path / "ddp")[-1]["val_loss"]
    assert estimate_loss(model, val) == pytest.approx(ddp_val, abs=1e-5)


@pytest.mark.slow
def test_ddp_resume_is_exact(data_dir, tmp_path):
    """Two processes: 2 steps, stop, resume to 3 == 3 steps straight (each rank's sampler and
    RNG state come back from the checkpoint)."""
    torchrun(tmp_path, data_dir, tmp_path / "straight", dropout=0.1)  # each rank's RNG matters
    torchrun(tmp_path, data_dir, tmp_path / "resumed", dropout=0.1, max_iters=2)
    torchrun(tmp_path, data_dir, tmp_path / "resumed", "--resume", dropout=0.1)
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "straight"))
