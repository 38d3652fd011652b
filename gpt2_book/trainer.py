# DRAFT (H3), to be exported from the notebook
"""draft"""

import contextlib
import functools
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from gpt2_book.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    RunLock,
    load_checkpoint,
    model_config_of,
    remove_stale_temp_files,
    save_checkpoint,
)
from gpt2_book.data import Batches, read_meta
from gpt2_book.distributed import (
    StopFlag,
    World,
    close_distributed,
    gather,
    init_distributed,
    no_sync,
    stop_on_signals,
    sum_over_ranks,
    wrap_ddp,
)
from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.train import TrainConfig, configure_optimizer, estimate_loss, fixed_batches, get_lr
from gpt2_book.utils import resolve_device

_log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `train` returns: the step reached, the training loss of every step it ran, and the
    evaluations (the rows it appended to `metrics.jsonl`)."""

    iters: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became nan or inf; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run after a step; `step` is where a resume
    continues (None: no checkpoint yet), `exit_code` the shell's 128 + signal number."""

    def __init__(self, message: str, *, signal_number: int, step: int | None) -> None:
        super().__init__(message)
        self.signal_number, self.step = signal_number, step
        self.exit_code = 128 + signal_number


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The rows of `metrics.jsonl` in a training output folder, one dict per evaluation."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


_AMP = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `TrainConfig.dtype` on `device`; None means plain float32."""
    if name != "auto":
        return _AMP[name]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Callable:
    """A factory of autocast contexts (or of no-op contexts for float32)."""
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


@dataclass
class _Run:
    """The state of one training run."""

    config: TrainConfig  # with the data's vocab_size
    model: GPT  # the plain model: what is saved and restored
    forward: torch.nn.Module  # what is called: the model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable
    batches: Batches
    eval_batches: dict[str, list]
    data_meta: dict
    world: World
    out_dir: Path
    stop: StopFlag
    it: int = 0  # optimizer steps done
    elapsed_offset: float = 0.0  # seconds spent in earlier sessions of this run
    last_saved: int | None = None  # step of the newest checkpoint on disk

    @property
    def path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME


def _initial_weights(config: GPTConfig, init_from: GPT, meta: dict) -> dict:
    """`init_from`'s weights for a model of `config`, after checking that they fit."""
    have = init_from.config
    if meta["vocab_size"] != have.vocab_size:
        raise ValueError(
            f"the data was prepared with the {meta['tokenizer']} tokenizer ({meta['vocab_size']:,}"
            f" tokens), but the initial weights have a vocabulary of {have.vocab_size:,}: "
            "prepare it with the weights' tokenizer (`prepare --tokenizer gpt2` for GPT-2's)"
        )
    if config.block_size > have.block_size and have.pos_encoding == "learned":
        raise ValueError(
            f"TrainConfig.model.block_size = {config.block_size} exceeds the "
            f"{have.block_size} positions the initial weights learned: lower it"
        )
    for name, value in asdict(config).items():
        if name not in ("vocab_size", "block_size", "dropout") and value != getattr(have, name):
            raise ValueError(
                f"TrainConfig.model.{name} = {value!r}, but the initial weights have "
                f"{name}={getattr(have, name)!r}: leave it unset, or set it to match"
            )
    weights = init_from.state_dict()
    if "transformer.wpe.weight" in weights:  # keep the positions this run uses
        weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"][: config.block_size]
    return weights


def _build(config, data_dir, out_dir, world, device, stop, init_from) -> _Run:
    """The model (random or `init_from`'s weights), optimizer, batches; nothing restored."""
    meta = read_meta(data_dir)
    config = config.replace(vocab_size=meta["vocab_size"])
    torch.manual_seed(config.seed)  # the same initial weights on every process
    model = GPT(config.model)
    if init_from is not None:
        model.load_state_dict(_initial_weights(config.model, init_from, meta))
    model.to(device)
    dtype = _amp_dtype(config.dtype, device)
    B, T = config.batch_size, config.model.block_size
    evals = {
        split: fixed_batches(data_dir, split, n=config.eval_iters, batch_size=B, block_size=T,
                             seed=config.seed + 10_000, device=device)  # not the training stream
        for split in ("train", "val")
    }  # fmt: skip
    return _Run(
        config=config,
        model=model,
        forward=model,
        optimizer=configure_optimizer(
            model,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=(config.beta1, config.beta2),
            device_type=device.type,
        ),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        autocast=_autocast(device, dtype),
        batches=Batches(data_dir, "train", B, T, device, config.seed, world.rank, world.world_size),
        eval_batches=evals,
        data_meta=meta,
        world=world,
        out_dir=out_dir,
        stop=stop,
    )


def _setup(config, data_dir, out_dir, resume, world, device, stop, init_from, allow_new_data):
    """Build the run, restore its checkpoint when resuming, wrap the model for compile/DDP."""
    exists = (out_dir / CHECKPOINT_NAME).exists()
    if resume and not exists:
        raise CheckpointError(f"nothing to resume: no {CHECKPOINT_NAME} in {out_dir}")
    if exists and not resume:
        raise CheckpointError(
            f"{out_dir} already holds a checkpoint: resume it (--resume), or choose another "
            "out dir (--out-dir)"
        )
    if config.grad_accum_steps % world.world_size:
        raise ValueError(
            f"TrainConfig.grad_accum_steps = {config.grad_accum_steps} must be a multiple of "
            f"the number of processes, {world.world_size}"
        )
    run = _build(config, data_dir, out_dir, world, device, stop, None if resume else init_from)
    torch.manual_seed(config.seed + world.rank)  # dropout: a different stream per process
    if resume:
        _restore(run, load_checkpoint(run.path), allow_new_data)
    if config.compile:
        run.forward = torch.compile(run.model)
    if world.world_size > 1:
        run.forward = wrap_ddp(run.forward, device)
    return run


def _vocabulary(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("tokenizer", "vocab_size", "chars")}


def _contents(meta: dict) -> dict:
    """What identifies a dataset's tokens: hashes of the text and token files, and sizes."""
    keys = [k for k in meta if "sha256" in k] + ["val_fraction", "train_tokens", "val_tokens"]
    return {k: meta.get(k) for k in keys}


def _check_same_data(saved: dict, meta: dict, allow_new_data: bool, where: Path) -> None:
    """Refuse to resume on other data: always with another vocabulary (the same ids would
    mean other tokens), and with other text unless `allow_new_data`."""
    if _vocabulary(saved) != _vocabulary(meta):
        raise CheckpointError(
            f"the run in {where} was trained with another vocabulary ({saved.get('tokenizer')}"
            f", {saved.get('vocab_size')} tokens): resume it with the data it was trained on"
        )
    old, new = _contents(saved), _contents(meta)
    changed = [k for k in old.keys() & new.keys() if old[k] != new[k]]
    if changed and not allow_new_data:
        raise CheckpointError(
            f"the run in {where} was trained on other data ({sorted(changed)[0]} differs): "
            "resume it with the same data, or allow new data explicitly (--allow-new-data)"
        )


def _restore(run: _Run, state: dict, allow_new_data: bool) -> None:
    """Load a checked checkpoint into a freshly built run, after checking that it fits."""
    _check_same_data(state["data_meta"], run.data_meta, allow_new_data, run.out_dir)
    saved, wanted = asdict(model_config_of(state, run.path)), asdict(run.model.config)
    for name, value in saved.items():
        if wanted[name] != value:
            raise CheckpointError(
                f"the checkpoint in {run.out_dir} has {name}={value!r}, but this run asks for "
                f"{name}={wanted[name]!r}: resume with the same model settings"
            )
    run.model.load_state_dict(state["model"])
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and run.scaler.is_enabled():
            run.scaler.load_state_dict(state["scaler"])
        ranks = state["ranks"]
        if len(ranks) == run.world.world_size:
            mine = ranks[run.world.rank]
            run.batches.load_state_dict(mine["batches"])
            torch.set_rng_state(mine["rng"]["cpu"])
            if mine["rng"]["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(mine["rng"]["cuda"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{run.path} is damaged: {type(err).__name__}: {err}") from None
    if len(ranks) != run.world.world_size:
        _log.warning("checkpoint of %d processes, resumed on %d: batches are redrawn",
                     len(ranks), run.world.world_size)  # fmt: skip
    run.it, run.elapsed_offset, run.last_saved = state["iter"], state["elapsed_s"], state["iter"]


def _kept(run: _Run) -> str:
    if run.last_saved is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint, step {run.last_saved}, is {run.path}"


def _finite_weights(model: GPT) -> bool:
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


def _checkpoint(run: _Run, elapsed_s: float) -> None:
    """Gather every process's sampler and RNG state; rank 0 writes the checkpoint.

    Weights that are no longer finite are never written: the run stops, keeping the last
    good checkpoint. (Every process holds the same weights, so all of them stop.)
    """
    if not _finite_weights(run.model):
        raise TrainingDiverged(
            f"the weights became nan or inf by step {run.it}; training stopped and "
            f"{_kept(run)}. Try a lower learning_rate or warmup over more steps."
        )
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    mine = {
        "batches": run.batches.state_dict(),
        "rng": {"cpu": torch.get_rng_state(), "cuda": cuda},
    }
    ranks = gather(mine, run.world)
    if run.world.master:
        state = {
            "iter": run.it,
            "elapsed_s": elapsed_s,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            "ranks": ranks,
            "train_config": asdict(run.config),
            "model_config": asdict(run.model.config),
            "data_meta": run.data_meta,
        }
        save_checkpoint(state, run.path)
    run.last_saved = run.it


def _step(run: _Run, lr: float) -> tuple[float, bool]:
    """One optimizer step: chapter 07's `train_step` with mixed precision and DDP.

    Returns the mean loss over all micro-batches of all processes, and whether any process
    was asked to stop (so that all of them stop after the same step).
    """
    accum = run.config.grad_accum_steps // run.world.world_size
    loss_sum = torch.zeros((), device=run.model.lm_head.weight.device)
    for micro in range(accum):
        x, y = next(run.batches)  # (B, T) each
        with no_sync(run.forward, skip=micro < accum - 1):  # average over processes once
            with run.autocast():
                _, loss = run.forward(x, y)
            run.scaler.scale(loss / accum).backward()  # float16: scaled against underflow
        loss_sum += loss.detach().float()
    stop = torch.tensor(float(run.stop.signal is not None), device=loss_sum.device)
    total, stops = sum_over_ranks(torch.stack([loss_sum / accum, stop]), run.world).tolist()
    loss = total / run.world.world_size
    if not math.isfinite(loss):  # before the bad gradient reaches the weights
        raise TrainingDiverged(
            f"the loss became {loss} at step {run.it}; training stopped and {_kept(run)}. "
            "Try a lower learning_rate or warmup over more steps."
        )
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.config.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)  # clip the true gradient, not the scaled one
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, stops > 0


def _eval_loss(run: _Run, batches: list) -> float:
    """estimate_loss over `batches`, each process taking every world_size-th one."""
    share = batches[run.world.rank :: run.world.world_size]
    mean = estimate_loss(run.model, share, run.autocast) if share else 0.0
    device = batches[0][0].device
    sums = torch.tensor([mean * len(share), len(share)], dtype=torch.float64, device=device)
    total, count = sum_over_ranks(sums, run.world).tolist()
    return total / count


def _evaluate(run: _Run, lr: float, tokens_per_s: float | None, elapsed_s: float) -> dict:
    """Measure train and val loss on the fixed batches; rank 0 appends them to the metrics."""
    row = {"iter": run.it}
    for split, batches in run.eval_batches.items():
        row[f"{split}_loss"] = _eval_loss(run, batches)
    if not all(math.isfinite(row[k]) for k in ("train_loss", "val_loss")):
        raise TrainingDiverged(
            f"the evaluation at step {run.it} gave {row}; training stopped and {_kept(run)}."
        )
    row.update(lr=lr, tokens_per_s=tokens_per_s, elapsed_s=round(elapsed_s, 3))
    if run.world.master:
        with open(run.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def _start_outputs(run: _Run, resume: bool) -> None:
    """Rank 0 writes config.json and starts metrics.jsonl (keeping rows up to a resume)."""
    if not run.world.master:
        return
    (run.out_dir / "config.json").write_text(json.dumps(asdict(run.config), indent=2) + "\n")
    path = run.out_dir / "metrics.jsonl"
    rows = read_metrics(run.out_dir) if resume and path.exists() else []
    kept = [row for row in rows if row["iter"] <= run.it]  # drop rows after the checkpoint
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))


def _interrupted(run: _Run, elapsed_s: float) -> TrainingInterrupted:
    """Save the steps done since the last checkpoint, then say where a resume continues."""
    name = signal.Signals(run.stop.signal).name
    if run.it != run.last_saved and (run.last_saved is not None or run.it > 0):
        _checkpoint(run, elapsed_s)
    if run.last_saved is None:
        where = "before the first checkpoint: there is nothing to resume"
    else:
        where = f"the checkpoint in {run.out_dir} is at step {run.last_saved}: "
        where += f"--resume continues from step {run.last_saved}"
    message = f"stopped by {name} after step {run.it}; {where}"
    return TrainingInterrupted(message, signal_number=run.stop.signal, step=run.last_saved)


def _loop(run: _Run, progress: bool, resumed: bool) -> TrainResult:
    """Evaluate and save every eval_interval steps (and at the end); step in between."""
    cfg, start, t0 = run.config, run.it, time.perf_counter()
    tokens_per_step = cfg.batch_size * cfg.model.block_size * cfg.grad_accum_steps
    result, window = TrainResult(run.it), [0, 0.0]  # (tokens, seconds) since the last eval
    show = progress and run.world.master
    with tqdm(total=cfg.max_iters, initial=run.it, unit="step", disable=not show) as bar:
        while True:
            lr, elapsed = get_lr(run.it, cfg), run.elapsed_offset + time.perf_counter() - t0
            due = run.it % cfg.eval_interval == 0 or run.it == cfg.max_iters
            if due and not (resumed and run.it == start):  # a resumed step was evaluated
                speed = window[0] / window[1] if window[1] else None
                result.evals.append(_evaluate(run, lr, speed, elapsed))
                if run.it > start:
                    _checkpoint(run, elapsed)
                window = [0, 0.0]
            if run.it >= cfg.max_iters:
                break
            step_start = time.perf_counter()
            loss, stop = _step(run, lr)
            dt = time.perf_counter() - step_start
            run.it, window = run.it + 1, [window[0] + tokens_per_step, window[1] + dt]
            result.losses.append(loss)
            bar.update()
            bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}"
            )
            if stop:
                raise _interrupted(run, run.elapsed_offset + time.perf_counter() - t0)
    result.iters = run.it
    return result


@contextlib.contextmanager
def _locked(out_dir: Path, world: World) -> Iterator[None]:
    """Rank 0 holds the run folder's lock; every process fails together if it is taken."""
    lock = RunLock(out_dir)
    error = None
    if world.master:
        try:
            lock.acquire()
            remove_stale_temp_files(out_dir)  # left by killed runs: no one else writes here
        except CheckpointError as err:
            error = str(err)
    errors = [e for e in gather(error, world) if e]
    if errors:
        raise CheckpointError(errors[0])
    try:
        yield
    finally:
        if world.master:
            lock.release()


def train(
    config: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    init_from: GPT | None = None,
    allow_new_data: bool = False,
) -> TrainResult:
    """Train a GPT on a dataset written by `gpt2_book.data.prepare`.

    Args:
        config: the run's settings (see TrainConfig and its presets).
        data_dir: the prepared dataset (train.bin, val.bin, meta.json).
        out_dir: where `ckpt.pt`, `metrics.jsonl` and `config.json` go; locked while training.
        resume: continue the run whose checkpoint is in out_dir, up to config.max_iters.
        progress: show a tqdm progress bar (rank 0 only).
        init_from: start from these weights instead of random ones (e.g. OpenAI's GPT-2);
            config.model must match them, except dropout and a smaller block_size.
        allow_new_data: let a resumed run continue on data other than its own (same vocabulary).
    Returns:
        TrainResult with the step reached, the loss of each step and the evaluations.
    Raises:
        ValueError, CheckpointError: the settings, data, folder or checkpoint do not fit.
        TrainingDiverged: nan or inf; TrainingInterrupted: SIGINT or SIGTERM.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    world, device = init_distributed(resolve_device(config.device))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # float32 matmuls on TF32 tensor cores
    try:
        with _locked(out_dir, world), stop_on_signals() as stop:
            run = _setup(config, data_dir, out_dir, resume, world, device, stop, init_from,
                         allow_new_data)  # fmt: skip
            _start_outputs(run, resume)
            return _loop(run, progress, resumed=resume)
    finally:
        close_distributed(world)
