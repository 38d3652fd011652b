"""Benchmark: greedy generation with and without the KV cache, and against Hugging Face.

Hand-written (not exported): speed targets live here, not in timed tests. Each run generates
256 new tokens from a 16-token prompt, batch 1, greedy, in learned-position mode, with

- ours, cached: `GPT.generate(..., temperature=0)` (prefill, then one token per step);
- ours, uncached: the same with `use_cache=False` (the whole sequence again at every step);
- Hugging Face: `GPT2LMHeadModel.generate(use_cache=True, do_sample=False)` on the same weights.

All three run in one process on one thread, interleaved (A B C A B C ...) so that they see the
same machine load, and are timed by process CPU time. We print the median tokens/s of each and
the medians of the per-round ratios, and check that all three produce the same tokens.

Targets (issue 5): on the GPT-2-shaped model, cached >= 5x uncached; on both models, ours
cached at least as fast as Hugging Face's (aim >= 1.2x on the small one, where per-token Python
overhead dominates).

Why the cache gains "only" about 3.6x on the GPT-2-shaped model (measured; the target was 5x):
a cached step there is bound by memory bandwidth, not arithmetic. Every new token reads the
whole (V, C) read-out matrix, 154 MB in float32, about 13 ms of the 19 ms a step takes on one
core, and no cache can shorten that; with only 2 layers and at most 272 positions, the
recomputation that the cache saves is a few times that. Hugging Face's cached generation runs
into the same wall (ours is about 1.0x of it there). Deeper models and longer texts gain more.

`use_cache=False` changes nothing but the cache: it still scores only the last position. With
`--naive` the script also times, once, the loop of chapter 05 (`greedy_loop`), which recomputes
everything *and* scores every position at every step, as a naive implementation does.

Usage::

    python benchmarks/bench_generate.py            # about 3 minutes on one core
    python benchmarks/bench_generate.py --quick    # fewer repetitions
    python benchmarks/bench_generate.py --naive    # plus chapter 05's loop (2 more minutes)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt2_book.gpt import GPT

try:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
except ImportError as err:  # pragma: no cover - a script, not a test
    raise SystemExit("this benchmark compares with transformers: pip install transformers") from err

PROMPT, NEW = 16, 256


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    V: int
    reps: int  # rounds of the cached runs
    uncached_reps: int  # rounds that also time the (slow) uncached run
    target_uncached: float  # least acceptable cached / uncached speed-up (0: none)
    target_hf: float  # least acceptable ours / Hugging Face speed-up


SHAPES = [
    Shape("small (4 layers, C 128, V 65)", 4, 4, 128, 65, 15, 3, 0.0, 1.2),
    Shape("GPT-2-shaped (2 layers, C 768, 12 heads, V 50304)", 2, 12, 768, 50304, 7, 2, 5.0, 1.0),
]


def build_models(shape: Shape) -> tuple[GPT, GPT2LMHeadModel]:
    """Hugging Face's model with random weights, and ours loaded from its checkpoint."""
    hf_config = GPT2Config(
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_embd=shape.n_embd,
        vocab_size=shape.V,
        n_positions=PROMPT + NEW,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        ours = GPT.from_pretrained(folder).eval()
    return ours, hf_model


def greedy_loop(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Chapter 05's naive loop: the whole context again, all positions scored, every step."""
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size :])[0][:, -1, :]  # (B, V)
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)  # (B, T + 1)
    return idx


def cpu_seconds(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def run(shape: Shape, quick: bool, naive: bool) -> bool:
    ours, hf_model = build_models(shape)
    prompt = torch.randint(0, shape.V, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    runs = {
        "ours, cached": lambda: ours.generate(prompt, NEW, temperature=0),
        "ours, uncached": lambda: ours.generate(prompt, NEW, temperature=0, use_cache=False),
        "Hugging Face, cached": lambda: hf_model.generate(
            prompt,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            use_cache=True,
            attention_mask=torch.ones_like(prompt),
            pad_token_id=0,
        ),
    }
    with torch.no_grad():
        outputs = {name: fn() for name, fn in runs.items()}  # warm-up, and the parity check
    same = all(torch.equal(out, outputs["ours, cached"]) for out in outputs.values())
    reps = max(2, shape.reps // 3) if quick else shape.reps
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(reps):
        for name, fn in runs.items():
            if name == "ours, uncached" and r >= shape.uncached_reps:
                continue
            with torch.no_grad():
                seconds[name].append(cpu_seconds(fn)[0])
    med = {name: statistics.median(s) for name, s in seconds.items()}
    hf_ratio = statistics.median(
        h / o for h, o in zip(seconds["Hugging Face, cached"], seconds["ours, cached"], strict=True)
    )
    cache_ratio = med["ours, uncached"] / med["ours, cached"]
    print(f"\n{shape.name}: {NEW} new tokens from {PROMPT}, batch 1, greedy, 1 thread")
    for name in runs:
        print(f"  {name:22s} {NEW / med[name]:9.1f} tokens/s  ({len(seconds[name])} runs)")
    print(f"  same tokens from all three: {same}")
    ok = same and hf_ratio >= shape.target_hf and cache_ratio >= shape.target_uncached
    print(f"  cached / uncached: {cache_ratio:6.2f}x  (target >= {shape.target_uncached})")
    print(f"  ours / Hugging Face: {hf_ratio:5.2f}x  (target >= {shape.target_hf})")
    if naive:
        with torch.no_grad():
            t, out = cpu_seconds(lambda: greedy_loop(ours, prompt, NEW))
        print(f"  chapter 05's naive loop: {NEW / t:.1f} tokens/s (1 run, same tokens: "
              f"{torch.equal(out, outputs['ours, cached'])}); cached / naive: "
              f"{t / med['ours, cached']:.1f}x")  # fmt: skip
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--naive", action="store_true", help="also time chapter 05's loop once")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    results = [run(shape, args.quick, args.naive) for shape in SHAPES]
    print("\nall targets met" if all(results) else "\nSOME TARGETS MISSED")


if __name__ == "__main__":
    main()
