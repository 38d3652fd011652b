"""Tests of gpt2_book.train (chapter notebooks/07_training.ipynb), on a tiny model on CPU."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2_book.train as train_mod
from gpt2_book.data import Batches, prepare, read_meta, shakespeare_path
from gpt2_book.gpt import GPT
from gpt2_book.train import (
    PRESET_NAMES,
    CheckpointError,
    TrainConfig,
    TrainingDiverged,
    get_lr,
    load_checkpoint,
    load_model,
    read_metrics,
    save_checkpoint,
    tokenizer_for,
    train,
)

ROOT = Path(__file__).resolve().parent.parent

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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The first 20,000 characters of the shipped corpus, prepared char-level."""
    folder = tmp_path_factory.mktemp("data")
    text = folder / "input.txt"
    text.write_text(shakespeare_path().read_text()[:20_000])
    prepare(text, folder / "char", tokenizer="char", block_size=16)
    return folder / "char"


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: fast for tiny models, and bit-for-bit repeatable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(out_dir: Path) -> dict:
    return load_checkpoint(out_dir)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- configuration -------------------------------------------------------------------------


def test_presets_exist_and_validate():
    assert set(PRESET_NAMES) == {"shakespeare-char-cpu", "shakespeare-char", "gpt2-small"}
    cpu = TrainConfig.from_preset("shakespeare-char-cpu")
    assert (cpu.n_layer, cpu.n_head, cpu.n_embd, cpu.block_size) == (4, 4, 128, 64)
    assert (cpu.batch_size, cpu.learning_rate, cpu.min_lr, cpu.beta2) == (12, 1e-3, 1e-4, 0.99)
    assert (cpu.max_iters, cpu.lr_decay_iters, cpu.dropout) == (2000, 2000, 0.0)
    gpu = TrainConfig.from_preset("shakespeare-char")
    assert (gpu.n_layer, gpu.n_head, gpu.n_embd, gpu.block_size) == (6, 6, 384, 256)


def test_gpt2_small_preset_has_124M_parameters():
    config = TrainConfig.from_preset("gpt2-small").model_config(vocab_size=50257)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = GPT(config)
    n = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    # OpenAI's checkpoint has 124,439,808; the preset trains without biases (nanoGPT's choice):
    # per layer c_attn 3C + attn c_proj C + c_fc 4C + mlp c_proj C + ln_1 C + ln_2 C, plus ln_f.
    C, L = 768, 12
    assert n == 124_439_808 - (L * 11 * C + C)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n_layer", 0),
        ("n_head", 3),
        ("dropout", 1.0),
        ("min_lr", 1.0),
        ("warmup_iters", 10**6),
        ("beta2", 1.0),
        ("grad_clip", -1.0),
        ("dtype", "float8"),
        ("device", "gpu7"),
        ("pos_encoding", "alibi"),
        ("eval_iters", 0),
    ],
)
def test_invalid_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\..*{field}"):
        TrainConfig(**{field: value})


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="no field 'layers'"):
        TrainConfig.from_preset("shakespeare-char-cpu", layers=2)


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


# ---- the loop --------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_metrics(data_dir, tmp_path):
    result = train(
        tiny_config(max_iters=30, lr_decay_iters=30, eval_interval=10),
        data_dir,
        tmp_path,
        progress=False,
    )
    rows = read_metrics(tmp_path)
    assert [r["iter"] for r in rows] == [0, 10, 20, 30]
    assert set(rows[0]) == {"iter", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"}
    vocab_size = read_meta(data_dir)["vocab_size"]
    assert rows[0]["val_loss"] == pytest.approx(math.log(vocab_size), abs=0.3)  # about ln V at init
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["elapsed_s"] > 0
    assert result.iters == 30 and len(result.losses) == 30 and result.evals == rows
    assert json.loads((tmp_path / "config.json").read_text())["train"]["max_iters"] == 30


def test_same_seed_same_loss_curve(data_dir, tmp_path):
    a = train(tiny_config(), data_dir, tmp_path / "a", progress=False)
    b = train(tiny_config(), data_dir, tmp_path / "b", progress=False)
    c = train(tiny_config(seed=7), data_dir, tmp_path / "c", progress=False)
    assert a.losses == b.losses and a.losses != c.losses
    assert [r["val_loss"] for r in a.evals] == [r["val_loss"] for r in b.evals]
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_resume_is_exact(data_dir, tmp_path):
    """k steps, stop, resume to n == n steps straight: same weights, optimizer and losses."""
    config = tiny_config(dropout=0.1, max_iters=7, eval_interval=2)  # dropout: RNG matters too
    straight = train(config, data_dir, tmp_path / "straight", progress=False)
    first = train(
        dataclasses.replace(config, max_iters=3), data_dir, tmp_path / "r", progress=False
    )
    second = train(config, data_dir, tmp_path / "r", resume=True, progress=False)
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
    monkeypatch.setattr(train_mod, "Batches", Whole)
    train(config, data_dir, tmp_path / "whole", progress=False)
    monkeypatch.setattr(train_mod, "Batches", Halves)
    train(
        dataclasses.replace(config, grad_accum_steps=2), data_dir, tmp_path / "acc", progress=False
    )
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "acc")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real = train_mod._forward_backward

    def poisoned(run):
        loss = real(run)
        return loss * float("nan") if run.it == 4 else loss

    monkeypatch.setattr(train_mod, "_forward_backward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"nan at step 4.*checkpoint, step 3"):
        train(tiny_config(max_iters=6), data_dir, tmp_path, progress=False)
    state = load_checkpoint(tmp_path)
    assert state["iter"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_compiled_model_saves_plain_names_and_resumes(data_dir, tmp_path, monkeypatch):
    real_compile = torch.compile  # the eager backend: real torch.compile wrapping, no C compiler
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager"))
    config = tiny_config(compile=True, max_iters=2, eval_iters=1)
    train(config, data_dir, tmp_path, progress=False)
    assert not any("_orig_mod" in name for name in weights(tmp_path))
    train(dataclasses.replace(config, max_iters=3), data_dir, tmp_path, resume=True, progress=False)
    assert load_checkpoint(tmp_path)["iter"] == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_and_resumes(dtype, data_dir, tmp_path):
    """The autocast paths (and float16's GradScaler) run on the CPU too."""
    config = tiny_config(dtype=dtype, max_iters=20, lr_decay_iters=20, eval_interval=10)
    result = train(dataclasses.replace(config, max_iters=10), data_dir, tmp_path, progress=False)
    state = load_checkpoint(tmp_path)
    assert bool(state["scaler"]) == (dtype == "float16")  # the loss scale is saved
    result2 = train(config, data_dir, tmp_path, resume=True, progress=False)
    assert all(math.isfinite(x) for x in result.losses + result2.losses)
    assert result2.evals[-1]["val_loss"] < result.evals[0]["val_loss"] - 0.3
    assert all(p.dtype == torch.float32 for p in weights(tmp_path).values())


# ---- checkpoints -----------------------------------------------------------------------------


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"format": "gpt2-book-checkpoint", "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_half_way(obj, f):
        real_save(obj, f)
        f.truncate(100)  # a partial file on disk ...
        raise OSError("disk full")  # ... and then the crash

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": "gpt2-book-checkpoint", "w": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


class _Payload:
    """Unpickling this object creates a folder: a stand-in for arbitrary code."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "ckpt.pt"
    torch.save({"format": "gpt2-book-checkpoint", "model": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(tmp_path)
    assert not marker.exists()


def test_damaged_missing_and_foreign_checkpoints_are_refused(data_dir, tmp_path):
    train(tiny_config(max_iters=1, eval_iters=1), data_dir, tmp_path / "run", progress=False)
    good = (tmp_path / "run" / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a gpt2-book"):
        load_checkpoint(tmp_path / "other.pt")


def test_resume_refuses_a_different_model_and_fresh_runs_refuse_to_overwrite(data_dir, tmp_path):
    train(tiny_config(max_iters=1, eval_iters=1), data_dir, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="n_embd=16.*n_embd=32"):
        train(tiny_config(n_embd=32, max_iters=2), data_dir, tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        train(tiny_config(), data_dir, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_config(), data_dir, tmp_path / "empty", resume=True, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match="'cuda' is not available"):
        train(tiny_config(device="cuda"), data_dir, tmp_path, progress=False)
    train(tiny_config(max_iters=1, eval_iters=1), data_dir, tmp_path, progress=False)
    with pytest.raises(ValueError, match="'cuda' is not available"):
        load_model(tmp_path, device="cuda")


def test_load_model_and_tokenizer_generate_text(data_dir, tmp_path):
    train(tiny_config(max_iters=2, eval_iters=1), data_dir, tmp_path, progress=False)
    model, state = load_model(tmp_path)
    tokenizer = tokenizer_for(state)
    assert not model.training and tokenizer.vocab_size == model.config.vocab_size
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    out = model.generate(idx, max_new_tokens=5)
    assert out.shape == (1, 11) and tokenizer.decode(out[0].tolist()).startswith("ROMEO:")


# ---- several processes -----------------------------------------------------------------------


DDP_RUN = dict(
    n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, grad_accum_steps=4, max_iters=3,
    eval_iters=2, eval_interval=2, warmup_iters=1, lr_decay_iters=3, learning_rate=1e-2,
    min_lr=1e-3, device="cpu",
)  # fmt: skip


def torchrun(data_dir: Path, out_dir: Path, *extra: str) -> None:
    """`torchrun --nproc_per_node=2 -m gpt2_book train` with DDP_RUN's settings, on CPU (gloo)."""
    settings = [x for k, v in DDP_RUN.items() for x in ("--" + k.replace("_", "-"), str(v))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gpt2_book", "train", "--data", str(data_dir), "--out-dir", str(out_dir),
           "--no-progress", *settings, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ddp_on_two_processes_matches_one_process(data_dir, tmp_path, monkeypatch):
    """torchrun, gloo, 2 CPU processes x 2 micro-batches == 1 process x 4 micro-batches that
    sees the same windows (rank 0's, rank 1's, rank 0's, ...)."""
    torchrun(data_dir, tmp_path / "ddp")
    assert len(load_checkpoint(tmp_path / "ddp")["ranks"]) == 2  # each rank's sampler state

    class Interleaved:  # one process drawing the windows both ranks drew, in turn
        def __init__(self, data_dir, split, batch_size, block_size, device, seed=0, **ignored):
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

    monkeypatch.setattr(train_mod, "Batches", Interleaved)
    config = TrainConfig.from_preset("shakespeare-char-cpu", **DDP_RUN)
    train(config, data_dir, tmp_path / "single", progress=False)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    torch.manual_seed(config.seed)
    init = GPT(config.model_config(read_meta(data_dir)["vocab_size"])).state_dict()
    assert not torch.equal(a["lm_head.weight"], init["lm_head.weight"])  # it did train
    # The two processes each evaluated half of the fixed batches and added up the sums.
    monkeypatch.undo()  # the real Batches again
    model, _ = load_model(tmp_path / "ddp")
    val = train_mod._fixed_batches(data_dir, "val", config, torch.device("cpu"))
    ddp_val = read_metrics(tmp_path / "ddp")[-1]["val_loss"]
    assert train_mod.estimate_loss(model, val) == pytest.approx(ddp_val, abs=1e-5)


def test_ddp_resume_is_exact(data_dir, tmp_path):
    """Two processes: 2 steps, stop, resume to 3 == 3 steps straight (each rank's sampler and
    RNG state come back from the checkpoint)."""
    dropout = ("--dropout", "0.1")  # so that each rank's RNG state matters too
    torchrun(data_dir, tmp_path / "straight", *dropout)
    torchrun(data_dir, tmp_path / "resumed", *dropout, "--max-iters", "2")
    torchrun(data_dir, tmp_path / "resumed", *dropout, "--resume")
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "straight"))
