"""Tests of gpt2_book.checkpoint (chapter notebooks/08_training_for_real.ipynb): atomic writes,
safe and checked loading, checksums, config validation, the run folder's lock."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _training import prepare_slice, tiny_config

from gpt2_book.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    RunLock,
    checksum,
    load_checkpoint,
    load_model,
    model_config_of,
    remove_stale_temp_files,
    save_checkpoint,
    tokenizer_for,
)
from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.trainer import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_slice(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """The checkpoint file of a 1-step run (read it, never change it: copy its bytes)."""
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(max_iters=1, eval_iters=1), data_dir, out, progress=False)
    return out / CHECKPOINT_NAME


def a_state(trained) -> dict:
    """A fresh, valid checkpoint state (as loaded) to break in a test."""
    state = load_checkpoint(trained)
    for key in ("format", "format_version", "checksums"):  # save_checkpoint adds them again
        del state[key]
    return state


# ---- writing ---------------------------------------------------------------------------------


def test_a_crash_while_saving_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    good = a_state(trained)
    save_checkpoint(good, path)
    real_save = torch.save

    def crash_half_way(obj, f):
        real_save(obj, f)
        f.truncate(100)  # a partial file on disk ...
        raise OSError(28, "No space left on device")  # ... and then the crash

    monkeypatch.setattr(torch, "save", crash_half_way)
    changed = {**good, "iter": 99}
    with pytest.raises(CheckpointError, match="no space left on device.*previous one is kept"):
        save_checkpoint(changed, path)
    assert load_checkpoint(path)["iter"] == good["iter"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_a_full_disk_inside_torch_save_is_one_line(trained, tmp_path, monkeypatch):
    """torch.save reports a failed write as RuntimeError('[enforce fail at inline_container...')."""

    def full_disk(obj, f):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
            "data/0: file write failed\nframe #0: ..."
        )

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write .*no space left on device\)"):
        save_checkpoint(a_state(trained), tmp_path / "ckpt.pt")


def test_non_finite_weights_are_never_written(trained, tmp_path):
    path = tmp_path / "ckpt.pt"
    state = a_state(trained)
    save_checkpoint(state, path)
    broken = {**state, "model": dict(state["model"])}
    broken["model"]["lm_head.weight"] = torch.full_like(state["model"]["lm_head.weight"], torch.nan)
    with pytest.raises(CheckpointError, match="refusing to write.*nan or inf"):
        save_checkpoint(broken, path)
    assert torch.equal(
        load_checkpoint(path)["model"]["lm_head.weight"], state["model"]["lm_head.weight"]
    )


# ---- reading ---------------------------------------------------------------------------------


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
    with pytest.raises(CheckpointError):
        load_model(tmp_path)
    assert not marker.exists()


def test_damaged_missing_and_foreign_checkpoints_are_refused(trained, tmp_path):
    good = trained.read_bytes()
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
    state = torch.load(trained, weights_only=True)
    torch.save({**state, "format_version": 1}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format version 1"):
        load_checkpoint(tmp_path / "old.pt")


def test_flipped_bytes_inside_a_tensor_are_detected(trained, tmp_path):
    raw = bytearray(trained.read_bytes())
    weight = torch.load(trained, weights_only=True)["model"]["transformer.h.0.mlp.c_fc.weight"]
    at = raw.find(weight.numpy().tobytes())  # torch.save stores tensor bytes as they are
    assert at > 0
    raw[at + 41] ^= 0x01  # the lowest bit of one byte of one weight
    (tmp_path / "ckpt.pt").write_bytes(raw)
    with pytest.raises(CheckpointError, match="model does not match its checksum"):
        load_checkpoint(tmp_path)


def test_non_finite_weights_are_refused_on_load(trained, tmp_path):
    state = torch.load(trained, weights_only=True)
    state["model"]["transformer.ln_f.weight"][0] = torch.nan
    state["checksums"]["model"] = checksum(state["model"])  # well formed, but broken
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="non-finite weights.*ln_f"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(tmp_path)


DELETE = object()  # a test's way to remove an entry


def _saved(state: dict, tmp_path) -> object:
    """Write `state` as it is (with fresh checksums) and return the folder."""
    state = dict(state)
    state["checksums"] = {k: checksum(state[k]) for k in ("model", "optimizer") if k in state}
    torch.save(state, tmp_path / "ckpt.pt")
    return tmp_path


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(optimizer=DELETE), "'optimizer' .* holds nothing"),
        (dict(data_meta=DELETE), "'data_meta' .* holds nothing"),
        (dict(iter="3"), "'iter' .* holds a str"),
        (dict(iter=True), "'iter' .* holds a bool"),
        (dict(iter=-1), "negative 'iter'"),
        (dict(ranks={}), "'ranks' .* holds a dict"),
        (dict(model=[1, 2]), "'model' .* holds a list"),
    ],
)
def test_wrong_structure_is_named(trained, tmp_path, change, message):
    state = torch.load(trained, weights_only=True)
    state.update(change)
    state = {k: v for k, v in state.items() if v is not DELETE}
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_saved(state, tmp_path))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(extra=1), "unknown field 'extra'"),
        (dict(n_layer=DELETE), "missing field 'n_layer'"),
        (dict(n_layer="1"), "invalid model_config"),
        (dict(n_embd=32), r"\(vocab_size, n_embd\) gives transformer.wte.weight the shape"),
        (dict(n_layer=2), r"n_layer=2, but it holds 1 blocks"),
        (dict(vocab_size=2**40), r"shape \(1099511627776, 16\), but the file holds \(59, 16\)"),
        (
            dict(mlp_ratio=2.0),
            r"\(mlp_ratio\) gives .*c_fc.weight the shape \(32, 16\).*\(64, 16\)",
        ),
        (dict(n_head=4, head_dim=2), r"\(n_head, head_dim\) gives .*c_attn.weight the shape \(24"),
        (dict(block_size=2**40), r"block_size=1099511627776 would need .* GiB of RoPE tables"),
        (dict(bias=True), r"c_attn.bias is missing in the file but \(48,\) in the model"),
    ],
)
def test_a_config_that_does_not_fit_the_weights_is_named_before_building(
    trained, tmp_path, change, message
):
    state = torch.load(trained, weights_only=True)
    config = {**state["model_config"], **change}
    state["model_config"] = {k: v for k, v in config.items() if v is not DELETE}
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        load_model(_saved(state, tmp_path))
    assert time.perf_counter() - start < 5  # nothing of vocab_size rows was allocated


def test_load_model_and_its_tokenizer(trained, data_dir):
    model, state = load_model(trained.parent)
    tokenizer = tokenizer_for(state)
    assert not model.training and tokenizer.vocab_size == model.config.vocab_size
    assert model.config == model_config_of(state)
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    assert model(idx)[0].shape == (1, 6, model.config.vocab_size)
    with pytest.raises(TypeError):
        load_model(trained, "cpu")  # device is keyword-only
    for meta, message in [
        ({"tokenizer": "bpe9"}, "unknown tokenizer 'bpe9'"),
        ({"tokenizer": "char", "chars": "abc"}, "3 tokens, its model 59"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            tokenizer_for({**state, "data_meta": meta})


@pytest.mark.parametrize("device", ["meta", "nonsense"])
def test_load_model_reads_devices_with_resolve_device(trained, device):
    with pytest.raises(ValueError, match="device|meta"):
        load_model(trained, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_a_clear_error(trained):
    with pytest.raises(ValueError, match="no cuda"):
        load_model(trained, device="cuda")


# ---- the run folder ------------------------------------------------------------------------


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    with pytest.raises(
        CheckpointError, match=rf"in use by another training run \(pid {os.getpid()}\)"
    ):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


@pytest.mark.slow
def test_a_lock_dies_with_its_process(tmp_path):
    """A holder killed with SIGKILL leaves no stale lock behind."""
    code = (
        "import sys, time; from gpt2_book.checkpoint import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # free again
    lock.release()


def test_stale_temp_files_are_removed(tmp_path):
    stale = [tmp_path / f".{CHECKPOINT_NAME}.{pid}.tmp" for pid in (11, 12)]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (tmp_path / "keep.txt").write_text("mine")
    assert remove_stale_temp_files(tmp_path) == stale
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_checksum_sees_values_shapes_and_types():
    a = {"w": torch.arange(6.0)}
    assert checksum(a) == checksum({"w": torch.arange(6.0)})
    for other in (
        {"w": torch.arange(6.0).reshape(2, 3)},
        {"w": torch.arange(6)},
        {"w": torch.arange(6.0) + 1e-6},
        {"v": torch.arange(6.0)},
    ):
        assert checksum(other) != checksum(a)
    assert checksum({"w": torch.ones(2, dtype=torch.bfloat16)})  # any dtype
    assert dataclasses.is_dataclass(GPTConfig) and GPT  # (imports used)
