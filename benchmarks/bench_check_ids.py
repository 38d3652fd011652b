"""Benchmark: the cost per generated token of `GPT.forward`'s id-range check.

Hand-written (not exported). `forward` checks that every id lies in [0, vocab_size) with one
`torch.aminmax` and a comparison that the host must wait for (on an accelerator, a sync). The
generation loop checks its prompt once and then calls `forward(..., check_ids=False)`, since it
only appends ids it sampled itself. This script measures what that saves: cached greedy
decoding, one token per step (prefill, then `forward(token, start_pos=t, kv_caches=...,
last_only=True)`), with the check on and off, on the same model and prompt.

Method, as in bench_model.py: one thread, process CPU time, the two variants interleaved
(A B, B A, ...) so that both see the same machine load; we print the median time per token of
each and the median of the per-pair differences. Process CPU time does not count time spent
waiting, so on an accelerator (where the cost is the wait) use wall time: `--wall`.

Usage::

    python benchmarks/bench_check_ids.py            # about 30 s on one core
    python benchmarks/bench_check_ids.py --device cuda --wall
"""

import argparse
import statistics
import time

import torch

from gpt2_book.generate import new_kv_caches
from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.utils import resolve_device

MODELS = {  # name: (GPTConfig overrides of "tiny"/"gpt2", prompt length, tokens per run)
    "tiny (3 x 48, V=65)": ("tiny", {}, 16, 200),
    "narrow 6 x 128, V=50257": ("gpt2", {"n_layer": 6, "n_head": 4, "n_embd": 128}, 16, 60),
}


@torch.no_grad()
def decode(model: GPT, prompt: torch.Tensor, n: int, *, check_ids: bool, clock) -> float:
    """Seconds per token for n cached greedy steps after the prompt (prefill not timed)."""
    caches = new_kv_caches(model, batch_size=prompt.size(0), max_len=prompt.size(1) + n)
    logits = model(prompt, kv_caches=caches, last_only=True)[0]  # (B, 1, V)
    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    t0 = clock()
    for t in range(prompt.size(1), prompt.size(1) + n):
        logits = model(token, start_pos=t, kv_caches=caches, last_only=True, check_ids=check_ids)
        token = logits[0][:, -1].argmax(-1, keepdim=True)  # (B, 1)
    if token.device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - t0) / n


def check_alone(model: GPT, token: torch.Tensor, clock, n: int = 2000) -> float:
    """Seconds per call of the check by itself, on a (1, 1) id tensor like a decode step's."""
    t0 = clock()
    for _ in range(n):
        model._check_input(token, 0, True)
    return (clock() - t0) / n


def bench(name: str, device: torch.device, reps: int, clock) -> None:
    preset, overrides, prompt_len, n = MODELS[name]
    torch.manual_seed(0)
    config = GPTConfig.from_preset(preset, block_size=1024, **overrides)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
    for check in (True, False):  # warm-up: allocator, kernels
        decode(model, prompt, n, check_ids=check, clock=clock)
    on, off = [], []
    for rep in range(reps):  # A B, B A, ...: neither variant always runs first
        for check in (True, False) if rep % 2 == 0 else (False, True):
            (on if check else off).append(decode(model, prompt, n, check_ids=check, clock=clock))
    saved = statistics.median(a - b for a, b in zip(on, off, strict=True))
    t_on, t_off = statistics.median(on), statistics.median(off)
    alone = statistics.median(check_alone(model, prompt[:, :1], clock) for _ in range(5))
    print(
        f"{name:<26} {t_on * 1e6:10.1f} {t_off * 1e6:10.1f} {saved * 1e6:+10.1f} "
        f"{100 * saved / t_on:+7.1f}% {alone * 1e6:10.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps ... (default cpu)")
    parser.add_argument("--reps", type=int, default=15, help="pairs of runs per model")
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    clock = time.perf_counter if args.wall else time.process_time
    print(
        f"torch {torch.__version__}, {device}, 1 thread, "
        f"{'wall' if args.wall else 'process CPU'} time, median of {args.reps} interleaved pairs"
    )
    print(
        f"{'model':<26} {'check µs':>10} {'no check':>10} {'saved µs':>10} {'saved':>8} "
        f"{'check alone':>11}"
    )
    print(f"{'':<26} {'per token':>10} {'per token':>10} {'per token':>10} {'':>8} {'µs/call':>11}")
    for name in MODELS:
        bench(name, device, args.reps, clock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
