import codecs
import functools
import glob
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


def _safe_cut(text: str) -> int:
    """The last index i > 0 where text[i] is a newline or a space after a non-space; 0 if none.

    GPT-2's pattern always ends a piece before such a character, so the tokens of text[:i] and
    text[i:] together are exactly the tokens of text.
    """
    for mark in ("\n", " "):
        i = text.rfind(mark)
        while i > 0:
            if not text[i - 1].isspace():
                return i
            i = text.rfind(mark, 0, i)
    return 0


def _text_pieces(path: Path, *, piece_bytes: int = 1 << 20) -> Iterator[str]:
    """A UTF-8 file's text in pieces of about `piece_bytes`, each ending at a `_safe_cut`."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(piece_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character split by the last read
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path} is not UTF-8 text: byte {offset - pending + err.start} is "
                    f"{err.object[err.start : err.start + 1]!r} ({err.reason}). "
                    "Convert it first, e.g. `iconv -f latin1 -t utf-8`."
                ) from None
            offset += len(block)
            cut = _safe_cut(text) if block else len(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]
            if not block:
                return


def _as_text(value: object, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field!r} holds a {type(value).__name__}, not text")
    return value


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    """The `field` of every record of a JSON Lines file, in order."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{n} is not UTF-8 text: convert the file first") from None
            except ValueError as err:
                raise ValueError(f"{path}:{n} is not a JSON record ({err})") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}:{n} has no field {field!r}: choose --text-field")
            yield _as_text(record[field], field, f"{path}:{n}")


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The `field` column of a Parquet file, read a batch of rows at a time."""
    import pyarrow.parquet as pq  # optional: only Parquet input needs it

    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        names = ", ".join(table.schema_arrow.names)
        raise ValueError(f"{path} has no field {field!r} (it has {names}): choose --text-field")
    for batch in table.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            yield _as_text(text, field, str(path))


@dataclass(frozen=True)
class Corpus:
    """Documents that can be read as often as needed, in the same order every time.

    Args:
        name: what meta.json records as the source.
        documents: starts a pass over the documents; each document is an iterable of text
            pieces (a whole text file is one document, read a piece at a time).
        special: whether the literal text `<|endoftext|>` is GPT-2's separator token (in
            plain text files, where people join documents with it) or ordinary text (records).
        size: the input's size in bytes, when known, for the progress bar's estimate.
    """

    name: str
    documents: Callable[[], Iterator[Iterable[str]]]
    special: bool = False
    size: int | None = None


RECORD_SUFFIXES = (".jsonl", ".parquet")


def _text_documents(paths: list[Path]) -> Iterator[Iterable[str]]:
    for path in paths:
        yield _text_pieces(path)


def _record_documents(paths: list[Path], field: str) -> Iterator[Iterable[str]]:
    for path in paths:
        read = _parquet_texts if path.suffix == ".parquet" else _jsonl_texts
        for text in read(path, field):
            yield (text,)


def _input_files(spec: str | Path) -> list[Path]:
    """A file; a folder's .txt, .jsonl and .parquet files (recursively); or a glob's files."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        kinds = (".txt", *RECORD_SUFFIXES)
        files = sorted(p for p in path.rglob("*") if p.suffix in kinds and p.is_file())
        if not files:
            raise ValueError(f"{path} is a folder without .txt, .jsonl or .parquet files")
        return files
    files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
    if not files:
        raise ValueError(f"{spec}: no such file or folder, and no file matches it as a pattern")
    return files


def open_corpus(spec: str | Path, *, text_field: str = "text") -> Corpus:
    """The corpus in a file, folder or glob pattern of UTF-8 text, JSON Lines or Parquet files.

    A text file is one document; in JSON Lines and Parquet each record is one, its text in
    `text_field`. Files are read in sorted order.
    """
    files = _input_files(spec)
    kinds = {p.suffix in RECORD_SUFFIXES for p in files}
    if len(kinds) > 1:
        raise ValueError(f"{spec} mixes text files with records: prepare them separately")
    size = sum(p.stat().st_size for p in files)
    if kinds.pop():
        return Corpus(str(spec), functools.partial(_record_documents, files, text_field), size=size)
    return Corpus(str(spec), functools.partial(_text_documents, files), special=True, size=size)


def _hf_documents(name: str, config: str | None, split: str, field: str) -> Iterator[tuple[str]]:
    import datasets  # optional: `pip install datasets`

    for n, record in enumerate(datasets.load_dataset(name, config, split=split, streaming=True)):
        if field not in record:
            raise ValueError(f"{name}: record {n} has no field {field!r}: choose --text-field")
        yield (_as_text(record[field], field, f"{name}, record {n}"),)


def hf_corpus(
    name: str, *, config: str | None = None, split: str = "train", text_field: str = "text"
) -> Corpus:
    """A Hugging Face dataset (a hub name or a local folder), streamed: nothing is stored first.

    Args:
        name: e.g. "HuggingFaceFW/fineweb-edu"; or a local folder of JSON Lines / Parquet files.
        config: the dataset's configuration, e.g. "sample-10BT".
        split: which split to read.
        text_field: the field of a record that holds its text.
    """
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ValueError(
            "reading a Hugging Face dataset needs the `datasets` library: pip install datasets"
        ) from None
    documents = functools.partial(_hf_documents, name, config, split, text_field)
    return Corpus(":".join(filter(None, [name, config, split])), documents)
