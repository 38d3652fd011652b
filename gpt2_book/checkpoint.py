# DRAFT (H3), to be exported from the notebook
"""draft"""

import contextlib
import dataclasses
import errno
import hashlib
import os
import pickle
import zipfile

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
from pathlib import Path

import torch
from torch import Tensor

from gpt2_book.data import TOKENIZERS, CharTokenizer, GPT2Tokenizer
from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.utils import resolve_device

CHECKPOINT_NAME = "ckpt.pt"
_FORMAT = "gpt2-book-checkpoint"
_VERSION = 2  # 2: checksums, and train_config holding its model config


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, unsafe, or does not fit the run."""


def _leaves(obj: object, path: str = "") -> list[tuple[str, object]]:
    """Every tensor and plain value inside nested dicts and lists, with a path naming it."""
    if isinstance(obj, dict):
        return [leaf for k in sorted(obj, key=str) for leaf in _leaves(obj[k], f"{path}/{k}")]
    if isinstance(obj, list | tuple):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, f"{path}/{i}")]
    return [(path, obj)]


def checksum(obj: object) -> str:
    """SHA-256 of every tensor's bytes, dtype and shape (and every other value) in `obj`."""
    digest = hashlib.sha256()
    for path, value in _leaves(obj):
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{path}:{t.dtype}:{tuple(value.shape)}:".encode())
            digest.update(t.view(torch.uint8).numpy())
        else:
            digest.update(f"{path}={value!r};".encode())
    return digest.hexdigest()


_CHECKED = ("model", "optimizer")  # the parts whose bytes a checksum guards


def _non_finite(weights: dict[str, Tensor]) -> list[str]:
    return [k for k, t in weights.items() if t.is_floating_point() and not t.isfinite().all()]


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically, with checksums of its model and optimizer.

    Temp file, fsync, then rename over the old one: a crash at any moment leaves either the
    old checkpoint or the new one. Non-finite weights are refused (CheckpointError) and the
    old file is kept; so is a failed write (disk full), reported as a CheckpointError.
    """
    path = Path(path)
    bad = _non_finite(state.get("model", {}))
    if bad:
        raise CheckpointError(f"refusing to write {path}: {bad[0]} holds nan or inf")
    state = {"format": _FORMAT, "format_version": _VERSION, **state}
    state["checksums"] = {k: checksum(state[k]) for k in _CHECKED if k in state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = "no space left on device" if _disk_full(err) else str(err).splitlines()[0]
        raise CheckpointError(
            f"could not write {path} ({reason}); the previous one is kept"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) == errno.ENOSPC or "file write failed" in str(err)


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files that killed writers left in `folder`; return them.

    Only safe while no other process writes checkpoints there: hold the run's lock.
    """
    stale = sorted(Path(folder).glob(f".{CHECKPOINT_NAME}.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class RunLock:
    """An exclusive lock on a run folder: one training run at a time writes there.

    `fcntl.flock` on `train.lock`, which holds the holder's pid. The operating system
    releases the lock when its process ends, however it ends, so a crash leaves no stale lock.
    (Where there is no fcntl, on Windows, the lock does nothing.)
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / "train.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise CheckpointError naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent} is in use by another training run (pid {holder}): wait "
                "for it to end, or choose another out dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None


_STRUCTURE = {  # entry: (type, what it holds)
    "format": (str, "the format name"),
    "format_version": (int, "the format version"),
    "iter": (int, "the optimizer steps done"),
    "elapsed_s": ((int, float), "the seconds trained"),
    "model": (dict, "the weights"),
    "optimizer": (dict, "AdamW's state"),
    "scaler": (dict, "the float16 loss scale"),
    "ranks": (list, "each process's sampler and RNG state"),
    "train_config": (dict, "the run's settings"),
    "model_config": (dict, "the model's GPTConfig"),
    "data_meta": (dict, "the dataset's meta.json"),
    "checksums": (dict, "the SHA-256 of the model and optimizer"),
}


def _check_structure(state: object, where: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{where} is not a gpt2-book training checkpoint")
    if state.get("format_version") != _VERSION:
        raise CheckpointError(
            f"{where} has format version {state.get('format_version')!r}, this gpt2-book "
            f"reads version {_VERSION}: train it again with this version"
        )
    for key, (kind, what) in _STRUCTURE.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "nothing" if key not in state else type(value).__name__
            raise CheckpointError(f"{where} is damaged: '{key}' ({what}) holds {got}")
    if state["iter"] < 0 or not all(isinstance(t, Tensor) for t in state["model"].values()):
        raise CheckpointError(
            f"{where} is damaged: a negative 'iter' or a weight that is no tensor"
        )


def _verify(state: dict, where: Path) -> None:
    for key in _CHECKED:
        if state["checksums"].get(key) != checksum(state[key]):
            raise CheckpointError(
                f"{where} is damaged: its {key} does not match the checksum stored with it"
            )
    bad = _non_finite(state["model"])
    if bad:
        raise CheckpointError(f"{where} holds non-finite weights ({bad[0]} has nan or inf)")


def load_checkpoint(path: str | Path) -> dict:
    """Read and check a checkpoint written by `train` (a file, or the folder of `ckpt.pt`).

    Loads with `torch.load(weights_only=True)`, so a file that would run code when unpickled
    is refused; then checks its structure, its checksums and that its weights are finite.
    Raises CheckpointError for missing, damaged, unsafe or foreign files.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint (not a zip file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain "
            "data, and unpickling them could run arbitrary code"
        ) from err
    except Exception as err:
        raise CheckpointError(f"{path} is damaged ({type(err).__name__}: {err})") from err
    _check_structure(state, path)
    _verify(state, path)
    return state


def model_config_of(state: dict, where: str | Path = "the checkpoint") -> GPTConfig:
    """The checkpoint's GPTConfig, checked against its weights before any model is built."""
    settings = state["model_config"]
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    if set(settings) != names:
        odd = sorted(set(settings) ^ names)[0]
        kind = "unknown" if odd in settings else "missing"
        raise CheckpointError(f"{where} is damaged: its model_config has an {kind} field {odd!r}")
    try:
        config = GPTConfig(**settings)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where} has an invalid model_config: {err}") from None
    _check_shapes(config, state["model"], where)
    return config


def _shape(t: Tensor | None) -> str:
    return "missing" if t is None else str(tuple(t.shape))


def _check_shapes(config: GPTConfig, weights: dict[str, Tensor], where: str | Path) -> None:
    """Compare the weights with the shapes `config` implies, cheap checks first."""
    wte = weights.get("transformer.wte.weight")
    layers = {k.split(".")[2] for k in weights if k.startswith("transformer.h.")}
    cheap = wte is not None and tuple(wte.shape) == (config.vocab_size, config.n_embd)
    if not cheap or len(layers) != config.n_layer:
        raise CheckpointError(
            f"{where}: its model_config (vocab_size={config.vocab_size}, n_embd="
            f"{config.n_embd}, n_layer={config.n_layer}) does not match its weights"
        )
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = GPT(config).state_dict()
    for name in sorted(expected.keys() | weights.keys()):
        want, have = expected.get(name), weights.get(name)
        if want is None or have is None or want.shape != have.shape:
            raise CheckpointError(
                f"{where}: {name} is {_shape(have)} in the file but {_shape(want)} for its "
                "model_config"
            )


def load_model(path: str | Path, *, device: str | torch.device | None = "cpu") -> tuple[GPT, dict]:
    """The trained model of a checkpoint (file or folder), in eval mode, and the checkpoint.

    `device` goes through `resolve_device` (None: the default device).
    """
    device = resolve_device(device)
    state = load_checkpoint(path)
    model = GPT(model_config_of(state, path))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def tokenizer_for(state: dict) -> CharTokenizer | GPT2Tokenizer:
    """The tokenizer a checkpoint's model was trained with, checked against the model."""
    meta, vocab_size = state["data_meta"], state["model_config"].get("vocab_size")
    name = meta.get("tokenizer")
    if name not in TOKENIZERS:
        raise CheckpointError(f"the checkpoint names an unknown tokenizer {name!r}")
    if name == "char" and not isinstance(meta.get("chars"), str):
        raise CheckpointError("the checkpoint's char tokenizer has no 'chars' string")
    tokenizer = CharTokenizer(meta["chars"]) if name == "char" else GPT2Tokenizer()
    if tokenizer.vocab_size != vocab_size:
        raise CheckpointError(
            f"the checkpoint's {name} tokenizer has {tokenizer.vocab_size} tokens but its "
            f"model {vocab_size}"
        )
    return tokenizer
