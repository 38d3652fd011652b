"""Benchmark: train a preset (default `shakespeare-char-cpu`) on a text file; print its val loss
and speed.

Hand-written (not exported). nanoGPT reports a validation loss of about 1.88 for this
configuration after 2,000 steps on the classic Tiny Shakespeare (its README's CPU run); this
script measures what our implementation reaches on any text, by default the corpus shipped in
the package. The chapters quote its output (chapter 07's table of the full run):

    python benchmarks/bench_train.py                         # the shipped Shakespeare
    python benchmarks/bench_train.py --seed 1                # another seed
    python benchmarks/bench_train.py --pos-encoding learned  # GPT-2's (and nanoGPT's) positions
    python benchmarks/bench_train.py --input input.txt       # e.g. Tiny Shakespeare
    python benchmarks/bench_train.py --max-iters 200         # a quick look
    python benchmarks/bench_train.py --device cuda --dtype bfloat16   # mixed precision on a GPU

Prints one line per evaluation, then the final val loss, wall time and tokens per second.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2_book.data import prepare
from gpt2_book.train import PRESET_NAMES, TrainConfig
from gpt2_book.trainer import train

TARGET = 1.88  # nanoGPT's published val loss for this preset on Tiny Shakespeare


def _config(args: argparse.Namespace) -> TrainConfig:
    overrides = {"device": args.device, "seed": args.seed, "dtype": args.dtype}
    if args.pos_encoding:
        overrides["pos_encoding"] = args.pos_encoding
    if args.max_iters:  # a shorter run: schedule and warmup shrink with it
        warmup = min(100, args.max_iters // 10)
        overrides.update(max_iters=args.max_iters, lr_decay_iters=args.max_iters)
        overrides.update(warmup_iters=warmup, eval_interval=max(1, args.max_iters // 8))
    return TrainConfig.from_preset(args.preset, **overrides)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="UTF-8 text file (default: the shipped corpus)")
    parser.add_argument("--preset", default="shakespeare-char-cpu", choices=PRESET_NAMES)
    parser.add_argument("--max-iters", type=int, help="default: the preset's (2,000)")
    parser.add_argument("--seed", type=int, default=1337, help="default 1337, the preset's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pos-encoding", choices=["rope", "learned"], help="default: preset's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = _config(args)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data_dir, out_dir = Path(tmp) / "data", Path(tmp) / "out"
        block_size = config.model.block_size
        meta = prepare(args.input, data_dir, tokenizer="char", block_size=block_size)
        print(
            f"data: {meta['source']} ({meta['train_tokens']:,} train / "
            f"{meta['val_tokens']:,} val tokens, vocabulary {meta['vocab_size']})"
        )
        print(f"config: {json.dumps(dataclasses.asdict(config))}")
        start = time.perf_counter()
        result = train(config, data_dir, out_dir, progress=False)
        wall = time.perf_counter() - start
    for row in result.evals:
        print(f"step {row['iter']:5d}  train {row['train_loss']:.4f}  val {row['val_loss']:.4f}")
    last = result.evals[-1]
    tokens = config.batch_size * block_size * config.grad_accum_steps * result.iters
    print(
        f"final val loss {last['val_loss']:.4f} after {result.iters} steps "
        f"(nanoGPT's figure on Tiny Shakespeare: {TARGET})"
    )
    speeds = [row["tokens_per_s"] for row in result.evals if row["tokens_per_s"]]
    print(f"training steps alone: {sum(speeds) / len(speeds):,.0f} tokens/s on average")
    print(
        f"wall time {wall:.1f} s, {tokens / wall:,.0f} tokens/s overall "
        f"(threads={args.threads}, device={args.device}, seed={args.seed})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
