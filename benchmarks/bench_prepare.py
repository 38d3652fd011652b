"""Tokenizing a large corpus: `prepare_corpus` against tiktoken's own encoder (chapter 12).

Hand-written (not exported): a benchmark, run from the repository root:

    python benchmarks/bench_prepare.py               # a ~1 GB corpus (several minutes)
    python benchmarks/bench_prepare.py --size 100    # ~100 MB, for a quick look

It writes a synthetic corpus made from the shipped Shakespeare (repeated to --size MB) into a
scratch folder and measures, side by side in one run, each method in a fresh process:

- tiktoken, one thread: `encode_ordinary` called on 64 MB slices (one core's ceiling; one call on
  a whole gigabyte would need gigabytes of memory for its list of ids);
- tiktoken batch, all threads: `encode_ordinary_batch` over 1 MB chunks, a thread per core;
- a process pool, as build-nanogpt's fineweb.py does it: 1 MB chunks to one process per core;
- `prepare_corpus` with every core (one worker process per core), and in one process: the whole
  job, reading, hashing, splitting and writing train.bin / val.bin included;

and then the peak memory of `prepare_corpus` for the --memory sizes, 100 MB and 1 GB by default:
the largest sum, over the process and its workers, of their proportional set size (PSS: each
page shared by n processes counts 1/n to each, so pages that fork shares count once), sampled
every 20 ms from /proc on Linux; elsewhere, the process's own peak resident set. It prints
tokens per second, the ratio to tiktoken's one-thread speed, the machine's cores and its load
before and after, since other programs on the machine slow every number down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLICE = 64 << 20  # characters per slice for the tiktoken baselines
CHUNK = 1 << 20  # characters per chunk handed to a thread or process


def _cpu_seconds() -> float:
    """User and system time of this process and its finished children so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of this process and of its largest child so far."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss: KB (Linux), B (macOS)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return own, child


def _slices(path: Path):
    """The file's text in slices of about SLICE characters, cut after a newline."""
    carry = ""
    with open(path, encoding="utf-8", newline="") as f:
        while block := f.read(SLICE):
            text = carry + block
            cut = text.rfind("\n") + 1 or len(text)
            yield text[:cut]
            carry = text[cut:]
    if carry:
        yield carry


def _chunks(text: str) -> list[str]:
    chunks, start = [], 0
    while start < len(text):
        end = text.rfind("\n", start, start + CHUNK) + 1 or min(start + CHUNK, len(text))
        if end <= start:
            end = min(start + CHUNK, len(text))
        chunks.append(text[start:end])
        start = end
    return chunks


def _encode_chunk(chunk: str):
    import numpy as np

    from gpt2_book.data import GPT2Tokenizer

    return np.asarray(GPT2Tokenizer().encoding.encode_ordinary(chunk), dtype=np.uint16)


def run_method(method: str, path: Path, workers: int, out: Path) -> dict:
    """Tokenize `path` one way; returns seconds, tokens and peak memory. Runs in a child."""
    from gpt2_book.data import GPT2Tokenizer

    enc = GPT2Tokenizer().encoding
    tokens, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    if method == "tiktoken, one thread":
        for text in _slices(path):
            tokens += len(enc.encode_to_numpy(text, disallowed_special=()))
    elif method == "tiktoken batch, all threads":
        for text in _slices(path):
            ids = enc.encode_ordinary_batch(_chunks(text), num_threads=workers)
            tokens += sum(map(len, ids))
    elif method == "process pool, all cores":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            for text in _slices(path):
                tokens += sum(len(a) for a in pool.map(_encode_chunk, _chunks(text)))
    elif method.startswith("prepare_corpus"):
        from gpt2_book.prepare import PrepareConfig, prepare_corpus

        config = PrepareConfig(block_size=1024, workers=workers)
        meta = prepare_corpus(path, out, config, progress=False)
        tokens = meta["train_tokens"] + meta["val_tokens"]
    else:
        raise ValueError(f"unknown method {method!r}")
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    own, child = _peak_rss_mb()
    return {"seconds": seconds, "cpu": cpu, "tokens": tokens, "rss_mb": own, "child_rss_mb": child}


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux's /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:  # the task ended meanwhile
                pass
    return found


def _pss_mb(pids: list[int]) -> float:
    """The summed proportional set size of `pids`, in MB."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])  # kB
        except OSError:  # the process ended meanwhile
            pass
    return total / 1024


def _in_child(method: str, path: Path, workers: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--input", str(path)]
    cmd += ["--workers", str(workers), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pipe = subprocess.PIPE
    child = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, env=env)
    peak = [0.0]

    def sample() -> None:  # the whole tree's memory, while the child runs
        while child.poll() is None:
            peak[0] = max(peak[0], _pss_mb(_tree(child.pid)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    if Path("/proc/self/smaps_rollup").exists():
        sampler.start()
    stdout, stderr = child.communicate()
    if child.returncode:
        raise SystemExit(f"{method} failed:\n{stderr}")
    if sampler.is_alive():
        sampler.join()
    return json.loads(stdout.strip().splitlines()[-1]) | {"pss_mb": peak[0]}


def make_corpus(path: Path, megabytes: int) -> Path:
    """The shipped corpus repeated to about `megabytes` MB (written once, then reused)."""
    from gpt2_book.data import shakespeare_path

    text = shakespeare_path().read_text(encoding="utf-8")
    copies = max(1, round(megabytes * 1e6 / len(text.encode())))
    if not path.exists() or path.stat().st_size != copies * len(text.encode()):
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(copies):
                f.write(text)
    return path


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=int, default=1000, help="corpus size in MB (1000); 0: only the memory"
    )
    parser.add_argument(
        "--memory", default="100,1000", help="sizes (MB) at which to measure prepare's memory"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the best counts (1)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--scratch", type=Path, help="default: a temporary folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_method(args.child, args.input, args.workers, args.out)))
        return
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores, {args.workers} workers; {_load()}")
    if args.size:
        throughput(scratch, args.size, args.workers, args.repeat)
    baseline = _in_child_baseline()
    print(f"peak memory of prepare_corpus (importing the package alone: {baseline:.0f} MB):")
    for size in (int(s) for s in args.memory.split(",") if s):
        path = make_corpus(scratch / f"corpus_{size}mb.txt", size)
        r = _in_child("prepare_corpus, all cores", path, args.workers, scratch / f"out_{size}")
        print(
            f"  {path.stat().st_size / 1e6:6,.0f} MB of text: "
            f"{r['pss_mb'] or float('nan'):5.0f} MB "
            f"PSS, all processes ({r['rss_mb']:.0f} MB resident in the main one, "
            f"{r['child_rss_mb']:.0f} in the largest worker; {r['seconds']:.0f} s, "
            f"{r['cpu']:.0f} CPU s, {r['tokens']:,} tokens)",
            flush=True,
        )
    print(f"\n{_load()}")
    if not args.scratch:
        import shutil

        shutil.rmtree(scratch)


def throughput(scratch: Path, size: int, workers: int, repeat: int) -> None:
    """The table of speeds: every method on the same corpus of `size` MB, the best of `repeat`
    rounds (the methods take turns, so a busy spell of the machine hits them all alike)."""
    corpus = make_corpus(scratch / f"corpus_{size}mb.txt", size)
    megabytes = corpus.stat().st_size / 1e6
    print(f"corpus: {corpus} ({megabytes:,.0f} MB)\n")
    methods = [
        ("tiktoken, one thread", 1),
        ("tiktoken batch, all threads", workers),
        ("process pool, all cores", workers),
        ("prepare_corpus, all cores", workers),
        ("prepare_corpus, one process", 1),
    ]
    results = {}
    for _ in range(repeat - 1):
        for method, n in methods:
            r = _in_child(method, corpus, n, scratch / "out")
            if method not in results or r["seconds"] < results[method]["seconds"]:
                results[method] = r
    print(
        f"{'method':30} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} {'x tiktoken':>10} "
        f"{'CPU s':>7} {'MB/CPU s':>8} {'peak MB':>8} {'PSS MB':>7}"
    )
    for method, n in methods:
        r = _in_child(method, corpus, n, scratch / "out")
        if method not in results or r["seconds"] < results[method]["seconds"]:
            results[method] = r
        r = results[method]
        ratio = results["tiktoken, one thread"]["seconds"] / r["seconds"]
        peak = f"{r['rss_mb']:.0f}" + (f"+{r['child_rss_mb']:.0f}" if r["child_rss_mb"] else "")
        print(
            f"{method:30} {r['seconds']:8.1f} {megabytes / r['seconds']:7.1f} "
            f"{r['tokens'] / r['seconds'] / 1e6:7.2f} {ratio:10.2f} {r['cpu']:7.1f} "
            f"{megabytes / r['cpu']:8.1f} {peak:>8} {r['pss_mb'] or float('nan'):7.0f}",
            flush=True,
        )
    print(
        "(CPU s: processor time used, all threads and processes; MB/CPU s: text per second of\n"
        " one core's time, which other programs on the machine change less than the wall time;\n"
        " peak MB: the process's own peak resident memory, +the largest child's, which counts\n"
        " the pages fork shares with the parent again; PSS MB: the whole tree's peak, shared\n"
        " pages counted once; nan where /proc has no smaps_rollup)\n"
    )


def _in_child_baseline() -> float:
    code = "import resource, gpt2_book.prepare; print(resource.getrusage(0).ru_maxrss / 1024)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return float(done.stdout.strip())


if __name__ == "__main__":
    main()
