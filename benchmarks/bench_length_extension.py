"""Benchmark: the full length-extension experiment of chapter 11, with seeds and a sweep.

Hand-written (not exported). Chapter 11 (`notebooks/11_experiments.ipynb`) runs a small version of
this live (one seed, one head size, one learning rate); this script runs the whole grid and writes
the table the chapter shows:

- two head sizes at the same width and parameter count (64 channels: 4 heads of 16, i.e. 8
  rotating pairs per head, or 1 head of 64, i.e. 32 pairs), 3 seeds each;
- per seed, a RoPE model and a learned-position model trained on 64-character windows of the
  shipped Shakespeare with a passkey planted in every window (`gpt2_book.passkey.with_passkeys`);
- rows without retraining: learned (sliding window of 64), RoPE as is, RoPE cropped to 64,
  position interpolation (PI), the NTK-aware base, YaRN;
- rows with a fine-tune of the same length for every arm (same steps, tokens per step, warmup,
  schedule and optimizer), each at every learning rate of a small sweep: plain RoPE, PI and YaRN
  tuned on 512-character windows, and a control tuned on 64-character windows and read through
  a 64-character window (the crop, with the same extra training);
- the learning rate of each arm is chosen by its mean loss at context 512 over the seeds on the
  first half of the validation split; every number reported comes from the second half.

Measured: mean loss per character (nats) on whole windows of 64, 128, 256 and 512 characters of
validation text, and passkey recall (accuracy of the key as the most likely next character after
the final marker, with the key 5 characters into the window) at 64, 128, 256 and 512. The table
shows mean +/- standard deviation over the seeds.

Usage::

    python benchmarks/bench_length_extension.py               # the full grid; --jobs 2 uses 2 cores
    python benchmarks/bench_length_extension.py --quick       # a smoke run: tiny budgets, 1 seed
    python benchmarks/bench_length_extension.py --out FILE    # default: benchmarks/results/...

Writes the raw numbers, the settings and the table as JSON (default
`benchmarks/results/length_extension.json`, which chapter 11 reads) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from gpt2_book.data import Batches, load_tokenizer, prepare, read_meta
from gpt2_book.evaluate import (
    load_tokens,
    loss_per_position,
    ntk_rope_base,
    rescale_rope,
    train_steps,
    yarn_rope,
)
from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.passkey import passkey_recall, passkey_windows, with_passkeys

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "length_extension.json"


@dataclass(frozen=True)
class Settings:
    """The recipe; chapter 11 checks that its live run uses the same values."""

    train_len: int = 64
    long_len: int = 512
    contexts: tuple[int, ...] = (64, 128, 256, 512)
    probe_contexts: tuple[int, ...] = (64, 128, 256, 512)
    n_layer: int = 3
    n_embd: int = 64
    heads: tuple[tuple[int, int], ...] = ((4, 16), (1, 64))  # (n_head, head_dim) per config
    keys: str = "XJQZ12()"  # the passkey alphabet: rare characters of the corpus
    marker: str = "&"
    recalls: int = 3
    base_steps: int = 1000
    base_batch: int = 16  # x train_len = 1,024 tokens per step
    base_lr: float = 1e-2
    base_warmup: int = 50
    tune_steps: int = 200
    tune_tokens: int = 1024  # per step, in every fine-tuning arm (2 x 512 or 16 x 64)
    tune_warmup: int = 20
    tune_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    eval_tokens: int = 4096  # characters of validation text per context
    probe_windows: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass
class RunResult:
    """Everything measured for one head configuration and one seed."""

    heads: str
    seed: int
    rows: dict[str, dict] = field(default_factory=dict)  # row name -> metrics
    seconds: float = 0.0


def _config(s: Settings, n_head: int, head_dim: int, vocab: int, pos: str) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, block_size=s.train_len, n_layer=s.n_layer, n_head=n_head,
                     n_embd=s.n_embd, head_dim=head_dim, pos_encoding=pos)  # fmt: skip


def _batches(s: Settings, data_dir: Path, length: int, seed: int, ids: dict):
    """Training batches of `length` tokens with passkeys, the same tokens per step at any length."""
    batch = s.base_batch if length == s.train_len else s.tune_tokens // length
    plain = Batches(data_dir, "train", batch, length, seed=seed)
    return with_passkeys(plain, keys=ids["keys"], marker=ids["marker"], recalls=s.recalls,
                         seed=seed)  # fmt: skip


def _measure(s: Settings, model: GPT, halves: dict, ids: dict, window: int | None) -> dict:
    """Loss per context on both halves of val, and passkey recall on the report half."""
    out = {}
    for half, tokens in halves.items():
        for ctx in s.contexts:
            if half == "select" and ctx != s.long_len:
                continue  # selection needs only the loss at the longest context
            n = max(1, s.eval_tokens // ctx)
            curve = loss_per_position(model, tokens, ctx, window=window, max_windows=n)
            out[f"{half}_loss_{ctx}"] = curve.mean().item()
            if half == "report" and ctx == s.long_len:
                out["report_far_loss"] = curve[s.train_len :].mean().item()
    for ctx in s.probe_contexts:
        windows, answer = passkey_windows(
            halves["report"], context=ctx, n=s.probe_windows, keys=ids["keys"],
            marker=ids["marker"], seed=ctx,
        )  # fmt: skip
        out[f"passkey_loss_{ctx}"], out[f"passkey_acc_{ctx}"] = passkey_recall(
            model, windows, answer, window=window
        )
    return out


def _no_retraining(s: Settings, rope: GPT, learned: GPT, hs: int) -> dict[str, tuple]:
    """Rows evaluated without retraining; each value is (model, window, per-context maker)."""
    f = s.long_len / s.train_len
    return {
        "learned, window 64": (learned, s.train_len),
        "rope": (rope, None),
        "rope, window 64": (rope, s.train_len),
        "rope + PI": (rescale_rope(rope, scale=1 / f), None),
        "rope + NTK base": (rescale_rope(rope, base=ntk_rope_base(rope.rope.base, hs, f)), None),
        "rope + YaRN": (yarn_rope(rope, factor=f, train_len=s.train_len), None),
    }


def _fine_tune_arms(s: Settings, rope: GPT) -> dict[str, tuple]:
    """Arm -> (starting model, training length, window when evaluated)."""
    f = s.long_len / s.train_len
    return {
        "tuned at 64, window 64": (rescale_rope(rope), s.train_len, s.train_len),
        "rope, tuned at 512": (rescale_rope(rope), s.long_len, None),
        "rope + PI, tuned at 512": (rescale_rope(rope, scale=1 / f), s.long_len, None),
        "rope + YaRN, tuned at 512": (
            yarn_rope(rope, factor=f, train_len=s.train_len),
            s.long_len,
            None,
        ),  # fmt: skip
    }


def run_one(s: Settings, n_head: int, head_dim: int, seed: int, data_dir: Path) -> RunResult:
    """Train, fine-tune and measure everything for one head configuration and one seed."""
    torch.set_num_threads(1)
    start = time.process_time()
    tok = load_tokenizer(data_dir)
    ids = {"keys": tok.encode(s.keys), "marker": tok.encode(s.marker)[0]}
    val = load_tokens(data_dir / "val.bin")
    halves = {"select": val[: len(val) // 2], "report": val[len(val) // 2 :]}
    result = RunResult(heads=f"{n_head}x{head_dim}", seed=seed)
    base = {}
    for pos in ("rope", "learned"):
        torch.manual_seed(seed)
        base[pos] = GPT(_config(s, n_head, head_dim, read_meta(data_dir)["vocab_size"], pos))
        batches = _batches(s, data_dir, s.train_len, seed, ids)
        train_steps(base[pos], batches, steps=s.base_steps, learning_rate=s.base_lr,
                    warmup_iters=s.base_warmup)  # fmt: skip
    for name, (model, window) in _no_retraining(s, base["rope"], base["learned"], head_dim).items():
        result.rows[name] = _measure(s, model, halves, ids, window)
    for arm, (start_model, length, window) in _fine_tune_arms(s, base["rope"]).items():
        for lr in s.tune_lrs:
            model = copy.deepcopy(start_model)
            torch.manual_seed(seed)
            batches = _batches(s, data_dir, length, seed + 1000, ids)
            train_steps(model, batches, steps=s.tune_steps, learning_rate=lr,
                        warmup_iters=s.tune_warmup)  # fmt: skip
            result.rows[f"{arm} @ lr {lr:g}"] = _measure(s, model, halves, ids, window)
    result.seconds = time.process_time() - start
    return result


# --- the table ----------------------------------------------------------------------------------

COLUMNS = [("report_loss_64", "loss 64"), ("report_loss_128", "loss 128"),
           ("report_loss_256", "loss 256"), ("report_loss_512", "loss 512"),
           ("passkey_acc_64", "key 64"),
    ("passkey_acc_128", "key 128"), ("passkey_acc_256", "key 256"),
           ("passkey_acc_512", "key 512")]  # fmt: skip


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(s: Settings, results: list[RunResult]) -> dict:
    """Per head configuration: the chosen learning rate of each arm, and mean/std of every cell."""
    table = {}
    for heads in sorted({r.heads for r in results}, key=lambda h: int(h.split("x")[1])):
        runs = [r for r in results if r.heads == heads]
        names = [n for n in runs[0].rows if " @ lr " not in n]
        arms = list(dict.fromkeys(n.split(" @ lr ")[0] for n in runs[0].rows if " @ lr " in n))
        chosen = {}
        for arm in arms:
            by_lr = {lr: statistics.mean(r.rows[f"{arm} @ lr {lr:g}"][f"select_loss_{s.long_len}"]
                                         for r in runs) for lr in s.tune_lrs}  # fmt: skip
            chosen[arm] = min(by_lr, key=by_lr.get)
            names.append(f"{arm} @ lr {chosen[arm]:g}")
        keys = [key for key, _ in COLUMNS] + ["report_far_loss"]
        cells = {n: {k: _mean_std([r.rows[n][k] for r in runs]) for k in keys} for n in names}
        table[heads] = {"chosen_lr": chosen, "cells": cells, "seeds": [r.seed for r in runs]}
    return table


def markdown(table: dict) -> str:
    """The table as GitHub-flavoured Markdown, one block per head configuration."""
    lines = []
    for heads, block in table.items():
        lines += [f"\n{heads} (heads x head size), mean +/- std over seeds {block['seeds']}:\n",
                  "| row | " + " | ".join(label for _, label in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]  # fmt: skip
        for name, cell in block["cells"].items():
            values = " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in (cell[k] for k, _ in COLUMNS))
            lines.append(f"| {name} | {values} |")
    return "\n".join(lines)


# --- running ------------------------------------------------------------------------------------


def _task(args: tuple) -> RunResult:
    s, n_head, head_dim, seed, data_dir = args
    result = run_one(s, n_head, head_dim, seed, Path(data_dir))
    print(f"done: {result.heads}, seed {seed}, {result.seconds:.0f} s CPU", flush=True)
    return result


def quick_settings() -> Settings:
    return replace(Settings(), base_steps=60, base_warmup=5, tune_steps=10, tune_warmup=2,
                   tune_lrs=(1e-3, 3e-3), seeds=(0, 1),
                   eval_tokens=1024, probe_windows=8)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny budgets")
    parser.add_argument("--jobs", type=int, default=1, help="processes (one thread each)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON goes")
    args = parser.parse_args()
    s = quick_settings() if args.quick else Settings()
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        data_dir = Path(folder) / "data"
        prepare(None, data_dir, tokenizer="char", block_size=s.long_len)
        tasks = [(s, nh, hd, seed, str(data_dir)) for nh, hd in s.heads for seed in s.seeds]
        if args.jobs > 1:
            with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
                results = pool.map(_task, tasks, chunksize=1)
        else:
            results = [_task(t) for t in tasks]
    table = aggregate(s, results)
    command = "python benchmarks/bench_length_extension.py" + (" --quick" if args.quick else "")
    report = {
        "command": command,
        "settings": asdict(s),
        "wall_seconds": time.time() - started,
        "cpu_seconds": sum(r.seconds for r in results),
        "torch": torch.__version__,
        "runs": [asdict(r) for r in results],
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(table))
    for heads, block in table.items():
        print(f"{heads}: learning rates chosen on the selection half: {block['chosen_lr']}")
    print(f"\n{report['wall_seconds'] / 60:.1f} min wall, {report['cpu_seconds'] / 60:.1f} min "
          f"CPU in the workers; written to {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
