"""The CPU "baby" Shakespeare run, side by side with nanoGPT's own `train.py`.

nanoGPT's README trains a 4-layer, 4-head, 128-wide model with a 64-character context, batch 12,
for 2,000 steps on a CPU (dropout 0, evaluation every 250 steps on 20 batches). Our preset
`shakespeare-char-cpu` is the same run. This script prepares the same text for both (nanoGPT's
own `data/shakespeare_char/prepare.py`, our `prepare`), then runs the two trainings one after
the other, `--repeats` times, alternating which goes first, and prints each run's wall time,
the CPU time of its process, and its final validation loss, with the ratios ours / nanoGPT;
and, run by run, the first evaluation at which our validation loss is at or below nanoGPT's
final one (the same comparison asked the other way: how many steps does ours need).

nanoGPT is not part of this repository: pass a checkout of https://github.com/karpathy/nanoGPT
(`git clone https://github.com/karpathy/nanoGPT`), which this script runs unchanged.

    python benchmarks/bench_baby_run.py --nanogpt ../nanoGPT --input path/to/input.txt
    python benchmarks/bench_baby_run.py --nanogpt ../nanoGPT --max-iters 200   # quick look
    python benchmarks/bench_baby_run.py --nanogpt ../nanoGPT --pos-encoding learned

The preset rotates queries and keys (RoPE) where nanoGPT adds learned positions; `--pos-encoding
learned` trains nanoGPT's own model with our code, the like-for-like comparison of the two loops.

Both use every core they are given (`--threads`, default 2, the machine this book is tested
on); wall times on a busy machine swing, which is why CPU time is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# nanoGPT README's CPU command (its `baby GPT` on a MacBook), with evaluation as ours does it.
NANOGPT_ARGS = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--dropout=0.0",
]


def _timed(cmd: list[str], cwd: Path, threads: int) -> tuple[float, float, str]:
    """Run cmd; return (wall seconds, CPU seconds of the child, its stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout + done.stderr


def _last_val(output: str, pattern: str) -> float:
    found = re.findall(pattern, output)
    if not found:
        sys.exit(f"no validation loss found in the output:\n{output[-2000:]}")
    return float(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    parser.add_argument("--input", type=Path, help="the text (default: the shipped corpus)")
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pos-encoding", choices=["rope", "learned"], help="default: preset's")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        sys.exit(f"{args.nanogpt} is not a nanoGPT checkout (no train.py)")
    work = Path(tempfile.mkdtemp(prefix="baby-run-"))
    if args.input is None:
        sys.path.insert(0, str(ROOT))
        from gpt2_book.data import shakespeare_path

        args.input = shakespeare_path()
    # nanoGPT's prepare.py reads input.txt beside itself (and downloads it only when absent).
    nano = work / "nanoGPT"
    shutil.copytree(args.nanogpt, nano, ignore=shutil.ignore_patterns(".git", "out*"))
    nano_data = nano / "data" / "shakespeare_char"
    shutil.copy(args.input, nano_data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=nano_data, check=True, capture_output=True)
    py = [sys.executable, "-m", "gpt2_book"]
    subprocess.run(
        [*py, "prepare", "--input", str(args.input), "--tokenizer", "char"]
        + ["--out-dir", str(work / "ours-data"), "--val-fraction", "0.1"],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    iters = [f"--max_iters={args.max_iters}", f"--lr_decay_iters={args.max_iters}"]
    # Both evaluate every 250 steps; for a shorter or odd length, at the start and the end only,
    # so that the last validation loss printed is at the same step in both.
    every = 250 if args.max_iters % 250 == 0 else args.max_iters
    iters.append(f"--eval_interval={every}")
    runs = {"nanoGPT": [], "ours": []}
    curves = {"nanoGPT": [], "ours": []}  # (step, val loss) at every evaluation
    for r in range(args.repeats):
        order = ["nanoGPT", "ours"] if r % 2 == 0 else ["ours", "nanoGPT"]
        for name in order:
            if name == "nanoGPT":
                out = f"--out_dir={work / f'nano-out-{r}'}"
                cmd = [sys.executable, "train.py", *NANOGPT_ARGS, *iters, out]
                wall, cpu, text = _timed(cmd, nano, args.threads)
                val = _last_val(text, r"val loss (\d+\.\d+)")
            else:
                cmd = [*py, "train", "--preset", "shakespeare-char-cpu", "--no-progress"]
                cmd += ["--data", str(work / "ours-data"), "--out-dir", str(work / f"out-{r}")]
                cmd += ["--max-iters", str(args.max_iters), "--lr-decay-iters", str(args.max_iters)]
                cmd += ["--eval-interval", str(every)]
                if args.pos_encoding:
                    cmd += ["--pos-encoding", args.pos_encoding]
                wall, cpu, text = _timed(cmd, ROOT, args.threads)
                val = _last_val(text, r"val loss (\d+\.\d+)")
            if name == "nanoGPT":
                curve = [
                    (int(i), float(v))
                    for i, v in re.findall(r"step (\d+):.*val loss (\d+\.\d+)", text)
                ]
            else:
                rows = (work / f"out-{r}" / "metrics.jsonl").read_text().splitlines()
                curve = [(row["iter"], row["val_loss"]) for row in map(json.loads, rows)]
            curves[name].append(curve)
            runs[name].append((wall, cpu, val))
            print(f"{name:8s} run {r}: wall {wall:7.1f} s  cpu {cpu:7.1f} s  val loss {val:.4f}")
    best = {name: min(rows) for name, rows in runs.items()}  # the least disturbed run of each
    (w_n, c_n, v_n), (w_o, c_o, v_o) = best["nanoGPT"], best["ours"]
    positions = args.pos_encoding or "the preset's"
    # Runs r of the two programs ran back to back: their ratio cancels most of a load change.
    pairs = sorted(o[1] / n[1] for o, n in zip(runs["ours"], runs["nanoGPT"], strict=True))
    print(
        f"\nbest of {args.repeats}, {args.max_iters} steps, {args.threads} threads, "
        f"ours with {positions} positions:\n"
        f"  wall  ours {w_o:.1f} s / nanoGPT {w_n:.1f} s = {w_o / w_n:.3f}\n"
        f"  cpu   ours {c_o:.1f} s / nanoGPT {c_n:.1f} s = {c_o / c_n:.3f}\n"
        f"  cpu, run by run: median {statistics.median(pairs):.3f} "
        f"(from {pairs[0]:.3f} to {pairs[-1]:.3f})\n"
        f"  val   ours {v_o:.4f} / nanoGPT {v_n:.4f}"
    )
    # The same question the other way round: when does ours first reach nanoGPT's final loss?
    for r, (ours_curve, nano_curve) in enumerate(
        zip(curves["ours"], curves["nanoGPT"], strict=True)
    ):
        goal = nano_curve[-1][1]
        reached = next((step for step, val in ours_curve if val <= goal), None)
        print(
            f"  run {r}: nanoGPT's final val loss {goal:.4f} (step {nano_curve[-1][0]}); "
            + (
                f"ours first at or below it at step {reached}"
                if reached is not None
                else "ours never at or below it"
            )
            + f" (evaluations every {every} steps)"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
