"""Benchmark: one training step of our GPT against Hugging Face's GPT2LMHeadModel.

Hand-written (not exported): speed targets live here, not in timed tests. A step is forward,
cross-entropy loss, backward and an AdamW update, on the same shapes and the same weights (in
rotary mode our model has the same weights minus the position table). Both models get the same
optimizer, the one our `configure_optimizer` builds: PyTorch's fused AdamW on CPUs, which is also
what Hugging Face's Trainer uses by default with PyTorch 2.8 or later (`adamw_torch_fused`), so
that the ratio measures the models. Both models run in one process on one thread, interleaved
A B A B so that both see the same machine load, and are timed by process CPU time: on a shared
machine, wall-clock timings of multi-threaded runs swing far more than the differences we are
looking for. We print the median of the per-pair ratios;
pairs alternate their order (A B, B A, ...) so that neither model always runs first, and their
quartiles, the spread that says how much to trust it.

Our step calls the model as our training loop does, `model(x, y, return_logits=False)`: the
cross-entropy fused with the read-out, which never holds all B x T x V logits (chapter 05).
Hugging Face's step computes the logits and then the cross-entropy, as its own loss does (its
Trainer can swap in Liger Kernel's fused loss, a Triton kernel for GPUs only).

Each shape and position mode runs twice: with GPT-2's tanh GELU in both models (ours
`gelu="tanh"`, Hugging Face's default `gelu_new`, its hand-written formula), and with the exact
GELU in both (ours `gelu="exact"`, Hugging Face's `activation_function="gelu"`), the like-for-like
row for models trained from scratch; torch's tanh GELU kernel is much slower than the erf one
on CPUs (chapter 03).

Targets (issue 14): at most 0.95x Hugging Face's step time on every shape and mode (aim: 0.90
at shape (a)). We also print tokens/s and achieved GFLOP/s against a measured
single-thread matmul peak.

Usage::

    python benchmarks/bench_model.py            # about 6 minutes on one quiet core
    python benchmarks/bench_model.py --quick    # a third of the repetitions, noisier
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.pretrained import from_pretrained
from gpt2_book.train import configure_optimizer

try:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.activations import ACT2FN
    from transformers.utils import logging as hf_logging
except ImportError as err:  # pragma: no cover - a script, not a test
    raise SystemExit("this benchmark compares with transformers: pip install transformers") from err


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    T: int
    B: int
    V: int
    target: float  # the largest acceptable ratio (ours / Hugging Face)
    reps: int


SHAPES = [
    Shape("(a) small", n_layer=4, n_head=4, n_embd=128, T=64, B=12, V=65, target=0.95, reps=30),
    Shape("(b) wide", n_layer=2, n_head=12, n_embd=768, T=256, B=4, V=50304, target=0.95, reps=6),
]


def matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """Single-thread float32 matmul throughput in GFLOP/s, the best of a few runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2 * n**3 / best / 1e9


# Our GPTConfig.gelu -> Hugging Face's activation_function for the same function.
HF_GELU = {"tanh": "gelu_new", "exact": "gelu"}


def build_models(shape: Shape, mode: str, gelu: str) -> tuple[GPT, GPT2LMHeadModel]:
    """Hugging Face's model with random weights, and ours loaded from its checkpoint."""
    hf_config = GPT2Config(
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_embd=shape.n_embd,
        vocab_size=shape.V,
        n_positions=shape.T,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    hf = GPT2LMHeadModel(hf_config)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = from_pretrained(tmp)  # gelu_new: our "tanh"
    hf.config.activation_function = HF_GELU[gelu]
    for block in hf.transformer.h:  # the activation is built per block from the config
        block.mlp.act = ACT2FN[HF_GELU[gelu]]
    if mode == "rope" or gelu != "tanh":  # same weights; rope: no position table
        converted = ours
        ours = GPT(GPTConfig(**{**vars(converted.config), "pos_encoding": mode, "gelu": gelu}))
        state = converted.state_dict()
        keep = {k: v for k, v in state.items() if mode == "learned" or "wpe" not in k}
        ours.load_state_dict(keep)
    return ours.train(), hf.train()


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ours: bool) -> Callable:
    opt = configure_optimizer(model, learning_rate=1e-4)  # the same AdamW for both models

    def step() -> float:
        t0 = time.process_time()
        if ours:  # as our training loop calls it: the loss alone, fused (chapter 05)
            _, loss = model(x, y, return_logits=False)
        else:  # as Hugging Face's loss works: all the logits, then the cross-entropy
            logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.process_time() - t0

    return step


def flops_per_step(model: GPT, shape: Shape) -> float:
    """Training FLOPs: 6 per matmul parameter per token, plus attention's score products."""
    matmul_params = model.num_params(non_embedding=True)  # wte counts: it is also lm_head
    attention = 12 * shape.n_layer * shape.n_embd * shape.T  # per token, forward + backward
    return (6 * matmul_params + attention) * shape.B * shape.T


def bench(shape: Shape, mode: str, gelu: str, reps: int, peak: float) -> bool:
    torch.manual_seed(0)
    ours, hf = build_models(shape, mode, gelu)
    data = torch.randint(0, shape.V, (shape.B, shape.T + 1))
    x, y = data[:, :-1], data[:, 1:]
    if mode == "learned":  # same weights, same function: the logits agree before timing
        with torch.no_grad():
            torch.testing.assert_close(ours(x)[0], hf(input_ids=x).logits, atol=1e-4, rtol=1e-4)
    a, b = step_fn(ours, x, y, ours=True), step_fn(hf, x, y, ours=False)
    for _ in range(1 if shape.V > 1000 else 3):  # warm-up: allocator, optimizer state
        a(), b()
    gc.collect()
    times_a, times_b = [], []
    for rep in range(reps):  # A B, B A, A B, ...: neither model always runs first
        if rep % 2:
            times_b.append(b())
            times_a.append(a())
        else:
            times_a.append(a())
            times_b.append(b())
    ratios = [ta / tb for ta, tb in zip(times_a, times_b, strict=True)]
    ratio = statistics.median(ratios)
    low, _, high = statistics.quantiles(ratios, n=4) if reps > 1 else (ratio, ratio, ratio)
    ta, tb = statistics.median(times_a), statistics.median(times_b)
    tokens = shape.B * shape.T
    gflops = flops_per_step(ours, shape) / ta / 1e9
    ok = ratio <= shape.target
    print(
        f"{shape.name:<10} {mode:<8} {HF_GELU[gelu]:<9} "
        f"{ta * 1e3:9.1f} {tb * 1e3:9.1f} {ratio:7.3f} [{low:.2f}, {high:.2f}] "
        f"{'<=' if ok else '> '} {shape.target:<5} {tokens / ta:9.0f} {tokens / tb:9.0f} "
        f"{gflops:8.1f} {100 * gflops / peak:6.1f}%"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a third of the repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions for every shape")
    parser.add_argument("--shape", choices=["a", "b"], default=None, help="only one shape")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    peak = matmul_peak()
    print(f"torch {torch.__version__}, 1 thread, matmul peak {peak:.1f} GFLOP/s (1024^3 float32)")
    print(
        f"{'shape':<10} {'mode':<8} {'GELU (HF)':<9} "
        f"{'ours ms':>9} {'HF ms':>9} {'ratio':>7} {'quartiles':<12}    target "
        f"{'ours tok/s':>9} {'HF tok/s':>9} {'GFLOP/s':>8} {'peak':>7}"
    )
    all_ok = True
    for shape in SHAPES:
        if args.shape and not shape.name.startswith(f"({args.shape})"):
            continue
        reps = args.reps or (max(3, shape.reps // 3) if args.quick else shape.reps)
        for mode in ["learned", "rope"]:
            for gelu in ["tanh", "exact"]:
                all_ok &= bench(shape, mode, gelu, reps, peak)
    print("all targets met" if all_ok else "some targets missed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
