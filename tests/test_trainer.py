"""Tests of gpt2_book.trainer and gpt2_book.runstate (chapter
notebooks/08_training_for_real.ipynb): the full run, exact resume, divergence, signals, the
lock, data identity, starting from given weights."""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _training import assert_same_weights, prepare_slice, tiny_config, weights

import gpt2_book.runstate as runstate
import gpt2_book.trainer as trainer_mod
from gpt2_book.checkpoint import CheckpointError, RunLock, load_checkpoint, load_model
from gpt2_book.data import Batches, read_meta
from gpt2_book.distributed import StopFlag, World
from gpt2_book.gpt import GPT
from gpt2_book.train import estimate_loss, fixed_batches
from gpt2_book.trainer import TrainingDiverged, TrainingInterrupted, read_metrics, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_slice(tmp_path_factory.mktemp("data"))


def quiet(config, data_dir, out_dir, **kwargs):
    return train(config, data_dir, out_dir, progress=False, **kwargs)


# ---- the loop --------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_metrics(data_dir, tmp_path):
    result = quiet(
        tiny_config(max_iters=30, lr_decay_iters=30, eval_interval=10), data_dir, tmp_path
    )
    rows = read_metrics(tmp_path)
    assert [r["iter"] for r in rows] == [0, 10, 20, 30]
    assert set(rows[0]) == {"iter", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"}
    vocab_size = read_meta(data_dir)["vocab_size"]
    assert rows[0]["val_loss"] == pytest.approx(math.log(vocab_size), abs=0.3)  # about ln V at init
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["elapsed_s"] > 0
    assert result.iters == 30 and len(result.losses) == 30 and result.evals == rows
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["max_iters"] == 30 and saved["model"]["vocab_size"] == vocab_size  # the data's V
    assert load_checkpoint(tmp_path)["model_config"]["vocab_size"] == vocab_size


def test_same_seed_same_loss_curve(data_dir, tmp_path):
    a = quiet(tiny_config(), data_dir, tmp_path / "a")
    b = quiet(tiny_config(), data_dir, tmp_path / "b")
    c = quiet(tiny_config(seed=7), data_dir, tmp_path / "c")
    assert a.losses == b.losses and a.losses != c.losses
    assert [r["val_loss"] for r in a.evals] == [r["val_loss"] for r in b.evals]
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_resume_is_exact(data_dir, tmp_path):
    """k steps, stop, resume to n == n steps straight: same weights, optimizer and losses."""
    config = tiny_config(dropout=0.1, max_iters=7, eval_interval=2)  # dropout: RNG matters too
    straight = quiet(config, data_dir, tmp_path / "straight")
    first = quiet(config.replace(max_iters=3), data_dir, tmp_path / "r")
    second = quiet(config, data_dir, tmp_path / "r", resume=True)
    assert first.losses + second.losses == straight.losses
    assert_same_weights(weights(tmp_path / "r"), weights(tmp_path / "straight"))
    opt_a = load_checkpoint(tmp_path / "r")["optimizer"]["state"]
    opt_b = load_checkpoint(tmp_path / "straight")["optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)
    resumed = {r["iter"]: r["val_loss"] for r in read_metrics(tmp_path / "r")}
    assert list(resumed) == [0, 2, 3, 4, 6, 7]  # the stop at 3 adds one evaluation
    assert all(resumed[r["iter"]] == r["val_loss"] for r in read_metrics(tmp_path / "straight"))


def test_gradient_accumulation_equals_a_big_batch(data_dir, tmp_path, monkeypatch):
    """2 micro-batches of 2 windows == 1 batch of the same 4 windows."""
    big = iter(Batches(data_dir, "train", 4, 16, seed=3))
    cached = [next(big) for _ in range(3)]

    class Halves:  # serves the same windows, split in two
        def __init__(self, *args, **kwargs):
            self.i = 0

        def __next__(self):
            x, y = cached[self.i // 2]
            half = slice(0, 2) if self.i % 2 == 0 else slice(2, 4)
            self.i += 1
            return x[half], y[half]

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    class Whole(Halves):
        def __next__(self):
            self.i += 1
            return cached[self.i - 1]

    config = tiny_config(max_iters=3, eval_iters=1, batch_size=4)
    monkeypatch.setattr(runstate, "Batches", Whole)
    quiet(config, data_dir, tmp_path / "whole")
    monkeypatch.setattr(runstate, "Batches", Halves)
    quiet(config.replace(grad_accum_steps=2), data_dir, tmp_path / "acc")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "acc")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_compiled_model_saves_plain_names_and_resumes(data_dir, tmp_path, monkeypatch):
    real_compile = torch.compile  # the eager backend: real torch.compile wrapping, no C compiler
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager"))
    config = tiny_config(compile=True, max_iters=2, eval_iters=1)
    quiet(config, data_dir, tmp_path)
    assert not any("_orig_mod" in name for name in weights(tmp_path))
    quiet(config.replace(max_iters=3), data_dir, tmp_path, resume=True)
    assert load_checkpoint(tmp_path)["iter"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_and_resumes(dtype, data_dir, tmp_path):
    """The autocast paths (and float16's GradScaler) run on the CPU too."""
    config = tiny_config(dtype=dtype, max_iters=20, lr_decay_iters=20, eval_interval=10)
    result = quiet(config.replace(max_iters=10), data_dir, tmp_path)
    state = load_checkpoint(tmp_path)
    assert bool(state["scaler"]) == (dtype == "float16")  # the loss scale is saved
    result2 = quiet(config, data_dir, tmp_path, resume=True)
    assert all(math.isfinite(x) for x in result.losses + result2.losses)
    assert result2.evals[-1]["val_loss"] < result.evals[0]["val_loss"] - 0.3
    assert all(p.dtype == torch.float32 for p in weights(tmp_path).values())


# ---- refusing what does not fit ------------------------------------------------------------


def test_resume_refuses_a_different_model_and_fresh_runs_refuse_to_overwrite(data_dir, tmp_path):
    quiet(tiny_config(max_iters=1, eval_iters=1), data_dir, tmp_path)
    with pytest.raises(CheckpointError, match="n_embd=16.*n_embd=32"):
        quiet(tiny_config(n_embd=32, max_iters=2), data_dir, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        quiet(tiny_config(), data_dir, tmp_path)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        quiet(tiny_config(), data_dir, tmp_path / "empty", resume=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        quiet(tiny_config(), data_dir, tmp_path / "file")


def test_resume_refuses_other_data_unless_allowed(data_dir, tmp_path):
    """Other text with the same characters: refused unless allowed. Other characters: refused."""
    quiet(tiny_config(max_iters=2, eval_iters=1), data_dir, tmp_path / "run")
    same_chars = prepare_slice(tmp_path / "a", start=0, n=19_000)  # same vocabulary, other text
    assert read_meta(same_chars)["chars"] == read_meta(data_dir)["chars"]
    with pytest.raises(CheckpointError, match="trained on other data.*--allow-new-data"):
        quiet(tiny_config(max_iters=3), same_chars, tmp_path / "run", resume=True)
    quiet(tiny_config(max_iters=3), same_chars, tmp_path / "run", resume=True, allow_new_data=True)
    other_chars = prepare_slice(tmp_path / "b", start=500_000, n=20_000)
    assert read_meta(other_chars)["chars"] != read_meta(data_dir)["chars"]
    with pytest.raises(CheckpointError, match="another vocabulary"):
        quiet(
            tiny_config(max_iters=4),
            other_chars,
            tmp_path / "run",
            resume=True,
            allow_new_data=True,
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "meta", "gpu7"])
def test_a_bad_device_is_a_clear_error(data_dir, tmp_path, device):
    with pytest.raises(ValueError, match="device|meta"):
        quiet(tiny_config(device=device), data_dir, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_second_run_is_refused_while_the_first_holds_the_folder(data_dir, tmp_path):
    quiet(tiny_config(max_iters=2, eval_iters=1), data_dir, tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    holder = RunLock(tmp_path)  # stands for a run that is still going
    holder.acquire()
    try:
        with pytest.raises(
            CheckpointError, match=rf"in use by another training run \(pid {os.getpid()}\)"
        ):
            quiet(tiny_config(max_iters=4), data_dir, tmp_path, resume=True)
        with pytest.raises(CheckpointError, match="in use"):
            quiet(tiny_config(), data_dir, tmp_path)  # the lock comes first
    finally:
        holder.release()
    assert (tmp_path / "metrics.jsonl").read_text() == before  # untouched
    quiet(tiny_config(max_iters=4), data_dir, tmp_path, resume=True)  # released after a run


def test_stale_temp_files_are_cleaned_on_start(data_dir, tmp_path):
    quiet(tiny_config(max_iters=2, eval_iters=1), data_dir, tmp_path)
    stale = tmp_path / ".ckpt.pt.4242.tmp"
    stale.write_bytes(b"half a checkpoint from a killed run")
    quiet(tiny_config(max_iters=3), data_dir, tmp_path, resume=True)
    assert not stale.exists()


# ---- divergence and signals ----------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real = GPT.forward

    def poisoned(self, idx, targets=None, **kwargs):
        logits, loss = real(self, idx, targets, **kwargs)
        if self.training and poisoned.steps == 4:
            loss = loss * float("nan")
        poisoned.steps += self.training
        return logits, loss

    poisoned.steps = 0
    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"nan at step 4.*last good checkpoint, step 3"):
        quiet(tiny_config(max_iters=6), data_dir, tmp_path)
    state = load_checkpoint(tmp_path)
    assert state["iter"] == 3


def test_broken_weights_never_replace_the_good_checkpoint(data_dir, tmp_path, monkeypatch):
    """Issue 13.1: a step that breaks the weights, followed by a checkpoint step."""
    real = runstate.configure_optimizer

    def breaking(model, **kwargs):
        optimizer = real(model, **kwargs)
        step = optimizer.step

        def broken_step(*args, **kw):
            result = step(*args, **kw)
            if optimizer.state[model.lm_head.weight]["step"] == 3:  # the 3rd step goes wrong
                with torch.no_grad():
                    model.transformer.h[0].mlp.c_fc.weight.fill_(float("inf"))
            return result

        optimizer.step = broken_step
        return optimizer

    monkeypatch.setattr(runstate, "configure_optimizer", breaking)
    with pytest.raises(TrainingDiverged, match=r"step 3.*last good checkpoint, step 2"):
        quiet(tiny_config(max_iters=6, eval_interval=1), data_dir, tmp_path)
    state = load_checkpoint(tmp_path)  # finite, and what the message says
    assert state["iter"] == 2


def test_the_last_check_before_writing_is_the_weights(data_dir, tmp_path):
    """Even with finite losses, weights that are not finite are never saved."""
    quiet(tiny_config(max_iters=2, eval_iters=1), data_dir, tmp_path)
    run = runstate.setup_run(
        tiny_config(max_iters=4),
        data_dir,
        tmp_path,
        resume=True,
        world=World(),
        device=torch.device("cpu"),
        stop=StopFlag(),
        init_from=None,
        allow_new_data=False,
    )
    with torch.no_grad():
        run.model.transformer.wte.weight[0, 0] = float("nan")
    run.it = 3
    with pytest.raises(TrainingDiverged, match="by step 3.*step 2"):
        trainer_mod._checkpoint(run, 1.0)
    assert load_checkpoint(tmp_path)["iter"] == 2


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_after_a_saved_step_and_resume_is_exact(
    data_dir, tmp_path, monkeypatch, signum, code
):
    config = tiny_config(max_iters=9, eval_interval=4, dropout=0.1)
    straight = quiet(config, data_dir, tmp_path / "straight")
    real = trainer_mod._step

    def step(run, lr):
        if run.it == 5:
            os.kill(os.getpid(), signum)  # arrives now, in the middle of step 5
        return real(run, lr)

    monkeypatch.setattr(trainer_mod, "_step", step)
    with pytest.raises(TrainingInterrupted) as stopped:
        quiet(config, data_dir, tmp_path / "run")
    err = stopped.value
    assert (err.exit_code, err.step, err.signal_number) == (code, 6, signum)
    assert "--resume continues from step 6" in str(err) and signal.Signals(signum).name in str(err)
    assert load_checkpoint(tmp_path / "run")["iter"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    resumed = quiet(config, data_dir, tmp_path / "run", resume=True)
    assert resumed.losses == straight.losses[6:]
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "straight"))


# ---- starting from given weights -----------------------------------------------------------


def _donor(data_dir, **changes) -> GPT:
    config = tiny_config(pos_encoding="learned", block_size=32, **changes)
    torch.manual_seed(5)
    return GPT(dataclasses.replace(config.model, vocab_size=read_meta(data_dir)["vocab_size"]))


def test_init_from_starts_from_the_given_weights(data_dir, tmp_path):
    donor = _donor(data_dir)
    config = tiny_config(pos_encoding="learned", block_size=16, dropout=0.1, max_iters=4)
    result = quiet(config, data_dir, tmp_path, init_from=donor)
    # The first evaluation is of the donor's weights (positions cut to the run's 16).
    val = fixed_batches(
        data_dir,
        "val",
        n=config.eval_iters,
        batch_size=config.batch_size,
        block_size=16,
        seed=config.seed + 10_000,
    )
    assert result.evals[0]["val_loss"] == pytest.approx(estimate_loss(donor, val), abs=1e-6)
    model, _ = load_model(tmp_path)
    assert model.transformer.wpe.weight.shape == (16, 16)
    quiet(config.replace(max_iters=6), data_dir, tmp_path, resume=True)  # resumes like any run


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_embd=32), r"n_embd=32 does not fit the initial weights, which have n_embd=16"),
        (dict(block_size=64), r"block_size=64 exceeds the 32 positions"),
        (dict(pos_encoding="rope"), r"pos_encoding='rope' does not fit"),
    ],
)
def test_init_from_refuses_settings_that_contradict_the_weights(
    data_dir, tmp_path, changes, message
):
    config = tiny_config(pos_encoding="learned", block_size=16).replace(**changes)
    with pytest.raises(ValueError, match=message):
        quiet(config, data_dir, tmp_path, init_from=_donor(data_dir))


def test_init_from_refuses_data_of_another_tokenizer(data_dir, tmp_path):
    donor = _donor(data_dir)
    donor.config = dataclasses.replace(donor.config, vocab_size=50257)  # stands for GPT-2's
    with pytest.raises(ValueError, match=r"char tokenizer \(59 tokens\).*vocabulary of 50,257"):
        quiet(tiny_config(pos_encoding="learned"), data_dir, tmp_path, init_from=donor)


# ---- a hostile user, through the command line ----------------------------------------------


def _start(data_dir, out_dir, *extra):
    settings = dict(
        n_layer=2,
        n_head=4,
        n_embd=192,
        block_size=32,
        batch_size=4,
        eval_interval=1,
        eval_iters=1,
        max_iters=100_000,
        lr_decay_iters=100_000,
        device="cpu",
    )
    flags = [x for k, v in settings.items() for x in ("--" + k.replace("_", "-"), str(v))]
    cmd = [
        sys.executable,
        "-m",
        "gpt2_book",
        "train",
        "--data",
        str(data_dir),
        "--out-dir",
        str(out_dir),
        "--no-progress",
        *flags,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_a_new_checkpoint(path, after: float, process) -> None:
    for _ in range(600):
        if path.exists() and path.stat().st_mtime > after:
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint was written")


@pytest.mark.slow
def test_kills_and_interrupts_never_lose_a_checkpoint(data_dir, tmp_path):
    """Checkpoints every step (a kill often lands inside a write); SIGINT and SIGTERM exit with
    130 and 143 and name the step that --resume continues from; SIGKILL loses no checkpoint."""
    out, path = tmp_path / "run", tmp_path / "run" / "ckpt.pt"
    rng = random.Random(0)
    for round_ in range(6):
        before = path.stat().st_mtime if path.exists() else 0.0
        process = _start(data_dir, out, *(["--resume"] if round_ else []))
        _wait_for_a_new_checkpoint(path, before, process)
        time.sleep(rng.uniform(0.0, 0.5))
        signum = [signal.SIGINT, signal.SIGKILL, signal.SIGTERM][round_ % 3]
        process.send_signal(signum)
        stderr = process.communicate(timeout=120)[1]
        state = load_checkpoint(out)  # always a good checkpoint
        if signum == signal.SIGKILL:
            assert process.returncode == -signal.SIGKILL
        else:
            assert process.returncode == 128 + signum, stderr
            assert f"--resume continues from step {state['iter']}" in stderr
            assert "Traceback" not in stderr
    assert len(read_metrics(out)) > 6
