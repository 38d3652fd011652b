import functools
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gpt2_book.corpus import Corpus, open_corpus
from gpt2_book.data import (
    EOT_TEXT,
    FORMAT_VERSION,
    TOKENIZERS,
    CharTokenizer,
    GPT2Tokenizer,
    read_meta,
)

UNIT_CHARS = 1 << 20  # characters per work unit: big enough to amortize sending it to a worker

# A work unit: (split, [(separator_before, text), ...], documents started in it).
Unit = tuple[str, list[tuple[bool, str]], int]


def _units(documents: Iterable[Iterable[str]], *, val_docs: int, unit_chars: int) -> Iterator[Unit]:
    """The corpus in order, as work units of about `unit_chars` characters.

    Documents 0 to val_docs - 1 go to "val", the rest to "train". A document's first piece
    carries separator_before=True when its split already holds text: the end-of-text token
    goes between documents.
    """
    started = {"train": False, "val": False}
    split, pieces, size, docs = ("val" if val_docs else "train"), [], 0, 0
    for n, document in enumerate(documents):
        if n == val_docs and val_docs and pieces:  # never mix two splits in one unit
            yield split, pieces, docs
            pieces, size, docs = [], 0, 0
        split, first = ("val" if n < val_docs else "train"), True
        for text in document:
            if not text:
                continue
            pieces.append((first and started[split], text))
            docs, first, started[split] = docs + first, False, True
            size += len(text)
            if size >= unit_chars:
                yield split, pieces, docs
                pieces, size, docs = [], 0, 0
    if pieces:
        yield split, pieces, docs


@functools.lru_cache(maxsize=1)
def _char_table(chars: str) -> np.ndarray:
    """Code point -> id for every Unicode code point; 2**32 - 1 for characters not in `chars`."""
    table = np.full(0x110000, 2**32 - 1, dtype=np.uint32)
    table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.uint32)
    return table


def _encode(unit: Unit, *, chars: str | None, special: bool) -> np.ndarray:
    """The token ids of one work unit, (N,) uint16. Runs in a worker process."""
    if chars is not None:  # the char tokenizer: one id per code point, no separator
        ids = _char_table(chars)[np.concatenate([_codes(text) for _, text in unit[1]])]
        if (ids == 2**32 - 1).any():
            raise ValueError("a character missing from the first pass: did the input change?")
        return ids.astype(np.uint16)
    enc = GPT2Tokenizer().encoding
    allowed = {EOT_TEXT} if special else set()
    parts = []
    for separator, text in unit[1]:
        if separator:
            parts.append(np.array([enc.eot_token], dtype=np.uint32))
        try:
            parts.append(enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=()))
        except UnicodeEncodeError:  # a lone surrogate, as web text sometimes holds: replace it
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            parts.append(enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=()))
    return np.concatenate(parts).astype(np.uint16)


def _codes(text: str) -> np.ndarray:
    """The Unicode code points of `text`, (N,) uint32."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _chars_in(task: tuple[Unit, int | None]) -> set[int]:
    """The distinct code points among a unit's first `limit` characters (all for None)."""
    unit, limit = task
    codes = _codes("".join(text for _, text in unit[1])[:limit])
    return set(np.flatnonzero(np.bincount(codes)).tolist())


def _ordered_map(fn: Callable, tasks: Iterable, *, workers: int) -> Iterator[tuple]:
    """(task, fn(task)) for every task, in order, computed by `workers` threads.

    At most 2 * workers tasks are in flight, so memory stays bounded however many there are
    (`Executor.map` would submit them all first). Threads run in parallel here because
    tiktoken and NumPy release Python's global lock while they compute.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        try:
            for task in tasks:
                pending.append((task, pool.submit(fn, task)))
                if len(pending) > 2 * workers:
                    task, future = pending.popleft()
                    yield task, future.result()
            while pending:
                task, future = pending.popleft()
                yield task, future.result()
        finally:  # stopped early (max_tokens, an error, Ctrl-C): drop the work not started
            for _, future in pending:
                future.cancel()


def _within(units: Iterable[Unit], max_chars: int | None) -> Iterator[tuple[Unit, int | None]]:
    """Each unit with how many of its characters are still within `max_chars`."""
    seen = 0
    for unit in units:
        if max_chars is not None and seen >= max_chars:
            return
        yield unit, None if max_chars is None else max_chars - seen
        seen += sum(len(text) for _, text in unit[1])


def _vocabulary(corpus: Corpus, *, max_tokens: int | None, workers: int, unit_chars: int) -> str:
    """Pass one of the char tokenizer: the sorted characters of the text pass two encodes."""
    units = _units(corpus.documents(), val_docs=0, unit_chars=unit_chars)
    chars = set()
    for _, found in _ordered_map(_chars_in, _within(units, max_tokens), workers=workers):
        chars |= found
    if len(chars) > 2**16:
        raise ValueError(
            f"{corpus.name} has {len(chars):,} distinct characters: too many for uint16"
        )
    return "".join(map(chr, sorted(chars)))


def _write_tokens(
    corpus: Corpus,
    files: dict,
    *,
    chars: str | None,
    val_docs: int,
    max_tokens: int | None,
    workers: int,
    unit_chars: int,
    bar: tqdm,
) -> dict:
    """Stream the corpus's token ids into the open split files, in order, as they come."""
    counts = {"train": 0, "val": 0, "documents": 0}
    source, read_bytes, total = hashlib.sha256(), 0, 0
    units = _units(corpus.documents(), val_docs=val_docs, unit_chars=unit_chars)
    encode = functools.partial(_encode, chars=chars, special=corpus.special)
    for (split, pieces, docs), ids in _ordered_map(encode, units, workers=workers):
        for separator, text in pieces:  # the text's hash, documents joined by <|endoftext|>
            data = text.encode("utf-8", "surrogatepass")
            source.update(EOT_TEXT.encode() + data if separator else data)
            read_bytes += len(data)
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        files[split].write(ids.tobytes())
        counts[split], counts["documents"], total = (
            counts[split] + len(ids),
            counts["documents"] + docs,
            total + len(ids),
        )
        if corpus.size and max_tokens is None:  # the progress bar's estimate of the total
            bar.total = max(total, round(total * corpus.size / max(read_bytes, 1)))
        bar.update(len(ids))
        if max_tokens is not None and total >= max_tokens:
            return counts | {"source_sha256": None}  # the corpus was not read to its end
    return counts | {"source_sha256": source.hexdigest()}


def _move_tail(train: Path, val: Path, n_val: int) -> None:
    """Move the last n_val tokens of the train file into the (empty) val file."""
    keep = train.stat().st_size - 2 * n_val
    with open(train, "r+b") as src, open(val, "wb") as dst:
        src.seek(keep)
        while block := src.read(1 << 24):
            dst.write(block)
        src.truncate(keep)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's list of names, to the disk (a power cut keeps it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are durable enough
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(out_dir: Path, staged: dict[str, Path]) -> None:
    """Rename the finished temp files into place, meta.json last: at every moment the folder
    holds the old dataset, no dataset (no meta.json), or the new one; never a mix."""
    for path in staged.values():
        _fsync(path)
    (out_dir / "meta.json").unlink(missing_ok=True)  # the old dataset ends here
    for name, path in staged.items():  # meta.json is the last entry
        os.replace(path, out_dir / name)
    _fsync(out_dir)


def _is_running(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap check: keep the file
    try:
        os.kill(pid, 0)  # signal 0 tests for existence and sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete the temp files of an earlier prepare that was killed (its pid is gone)."""
    for path in out_dir.glob(".*.tmp"):
        pid = path.name.split(".")[-2]  # ".train.bin.<pid>.tmp"
        if pid.isdigit() and not _is_running(int(pid)):
            path.unlink(missing_ok=True)


def _check_settings(tokenizer, val_fraction, val_docs, max_tokens, block_size, workers) -> None:
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, not {tokenizer!r}")
    if val_docs is not None and val_fraction is not None:
        raise ValueError("give val_fraction or val_docs, not both")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, not {val_fraction!r}")
    counts = dict(val_docs=val_docs, max_tokens=max_tokens, block_size=block_size, workers=workers)
    for name, value in counts.items():
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")


def _cpu_count() -> int:
    """The cores this process may run on (fewer than the machine's under a CPU limit)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _tokenize(corpus: Corpus, staged: dict[str, Path], progress: bool, **options) -> dict:
    """Pass(es) over the corpus, writing the staged token files; returns the counts."""
    tokenizer, val_docs = options.pop("tokenizer"), options.pop("val_docs") or 0
    chars = _vocabulary(corpus, **options) if tokenizer == "char" else None
    with (
        open(staged["train.bin"], "wb") as train,
        open(staged["val.bin"], "wb") as val,
        tqdm(total=options["max_tokens"], unit="tok", unit_scale=True, disable=not progress) as bar,
    ):
        files = {"train": train, "val": val}
        counts = _write_tokens(corpus, files, chars=chars, val_docs=val_docs, bar=bar, **options)
    return counts | {"chars": chars}


def prepare_corpus(
    corpus: Corpus | str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str = "gpt2",
    val_fraction: float | None = None,
    val_docs: int | None = None,
    max_tokens: int | None = None,
    block_size: int = 1024,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize a corpus of any size into `train.bin`, `val.bin` and `meta.json`, streaming.

    Memory stays bounded, every core works, and the token files are written as the ids come,
    under temporary names; the dataset appears, meta.json last, only once it is complete.

    Args:
        corpus: a `Corpus`, or a file, folder or glob pattern for `open_corpus`.
        out_dir: the folder to write; a dataset already there is replaced only at the end.
        tokenizer: "gpt2" (documents separated by <|endoftext|>, id 50256) or "char" (two
            passes: the vocabulary, then the ids).
        val_fraction: the share of the token stream, from its end, kept for validation
            (0.1 when neither this nor val_docs is given).
        val_docs: instead, the first `val_docs` documents make the validation split.
        max_tokens: stop after this many tokens (to try things out on part of a corpus).
        block_size: the longest window training will ask for; each split must be longer.
        workers: processes that tokenize (default: every core this process may use).
        progress: show a progress bar with tokens/s and an estimate of the time left.
    Returns:
        The metadata written to `meta.json`.
    """
    _check_settings(tokenizer, val_fraction, val_docs, max_tokens, block_size, workers)
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: give a folder for the dataset")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    staged = {n: out_dir / f".{n}.{os.getpid()}.tmp" for n in ("train.bin", "val.bin", "meta.json")}
    try:
        counts = _tokenize(
            corpus,
            staged,
            progress,
            tokenizer=tokenizer,
            val_docs=val_docs,
            max_tokens=max_tokens,
            workers=workers or _cpu_count(),
            unit_chars=UNIT_CHARS,
        )
        total = counts["train"] + counts["val"]
        n_val = counts["val"] if val_docs else int(total * (val_fraction or 0.1))
        if not val_docs:
            _move_tail(staged["train.bin"], staged["val.bin"], n_val)
        if min(total - n_val, n_val) < block_size + 1:
            raise ValueError(
                f"{corpus.name} is too small: {total - n_val:,} train and {n_val:,} val tokens, "
                f"but each split needs block_size + 1 = {block_size + 1:,}"
            )
        tok = CharTokenizer(counts["chars"]) if tokenizer == "char" else GPT2Tokenizer()
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tokenizer,
            "val_fraction": None if val_docs else (val_fraction or 0.1),
            "val_docs": val_docs,
            "chars": counts["chars"],
            "vocab_size": tok.vocab_size,
            "eot": tok.eot,
            "dtype": "uint16",
            "train_tokens": total - n_val,
            "val_tokens": n_val,
            "sha256": {s: _file_sha256(staged[f"{s}.bin"]) for s in ("train", "val")},
            "source": corpus.name,
            "source_sha256": counts["source_sha256"],
            "documents": counts["documents"],
            "max_tokens": max_tokens,
        }
        staged["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        _publish(out_dir, staged)
    finally:
        for path in staged.values():  # after an error or Ctrl-C; renamed ones are gone already
            path.unlink(missing_ok=True)
    return meta


def verify(data_dir: str | Path) -> dict:
    """`read_meta`, and then the SHA-256 of both token files compared with meta.json's."""
    meta = read_meta(data_dir)
    for split in ("train", "val"):
        path = Path(data_dir) / f"{split}.bin"
        if _file_sha256(path) != meta["sha256"][split]:
            raise ValueError(f"{path} does not match the sha256 in meta.json: run prepare again")
    return meta
