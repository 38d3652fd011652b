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
    python benchmarks/bench_train.py --optimizers            # AdamW's three implementations

Prints one line per evaluation, then the final val loss, wall time and tokens per second.
`--optimizers` instead times one AdamW step on the preset model's parameters with each of
PyTorch's implementations (a Python loop over the tensors, "foreach", "fused"), interleaved, by
process CPU time, and prints their ratios to the fused one that `configure_optimizer` picks on
CPUs and CUDA (chapter 07).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2_book.data import prepare
from gpt2_book.gpt import GPT
from gpt2_book.train import PRESET_NAMES, TrainConfig, configure_optimizer
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


def compare_optimizers(config: TrainConfig, reps: int = 50) -> None:
    """One AdamW step of each implementation on the preset model, interleaved; CPU time."""
    # This script trains on characters: about 65 of them, not GPT-2's 50,257 tokens.
    model = GPT(dataclasses.replace(config.model, vocab_size=65)).to(config.device)
    kinds = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {}
    for name, flags in kinds.items():
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizers[name] = torch.optim.AdamW(params, lr=1e-3, **flags)
    chosen = configure_optimizer(model, learning_rate=1e-3).defaults
    picked = "fused" if chosen["fused"] else "foreach" if chosen["foreach"] else "for-loop"
    times = {name: [] for name in kinds}
    for rep in range(reps + 2):  # two warm-up rounds create the optimizer state
        for name, opt in optimizers.items() if rep % 2 else reversed(optimizers.items()):
            start = time.process_time()
            opt.step()
            if rep >= 2:
                times[name].append(time.process_time() - start)
    n = sum(p.numel() for p in model.parameters())
    print(f"AdamW step on {n:,} parameters ({config.device}), median of {reps}:")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times["fused"], strict=True))
        print(f"  {name:9s} {statistics.median(ts) * 1e3:8.2f} ms  {ratio:5.2f}x fused")
    print(f"configure_optimizer picks: {picked}")


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
    parser.add_argument("--optimizers", action="store_true", help="time AdamW's implementations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = _config(args)
    if args.optimizers:
        compare_optimizers(config)
        return 0

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
