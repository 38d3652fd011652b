"""gpt2_book.corpus and gpt2_book.prepare: streaming tokenization of corpora of any size."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2_book import corpus as corpus_module
from gpt2_book import prepare as prepare_module
from gpt2_book.corpus import Corpus, _safe_cut, _text_pieces, hf_corpus, open_corpus
from gpt2_book.data import (
    EOT_TEXT,
    Batches,
    GPT2Tokenizer,
    load_tokenizer,
    prepare,
    read_meta,
    shakespeare_path,
)
from gpt2_book.prepare import PrepareConfig, prepare_corpus, verify

ROOT = Path(__file__).resolve().parent.parent
SMALL = PrepareConfig(block_size=8, unit_chars=3_000)  # many small work units


@pytest.fixture(scope="module")
def text() -> str:
    return shakespeare_path().read_text(encoding="utf-8")[:60_000]


@pytest.fixture
def small_pieces(monkeypatch):
    """Read text files a few kilobytes at a time, so that every path cuts text many times."""
    monkeypatch.setattr(corpus_module, "PIECE_BYTES", 2_000)


@pytest.fixture
def neutral(tmp_path_factory) -> Path:
    """A scratch folder for `datasets`, which takes a folder named test_* for a "test" split."""
    return tmp_path_factory.mktemp("corpora")


@pytest.fixture
def records(text) -> list[dict]:
    speeches = text.split("\n\n")[:60]
    return [{"text": s, "id": i} for i, s in enumerate(speeches)]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _ids(folder: Path, split: str) -> list[int]:
    return np.fromfile(folder / f"{split}.bin", dtype=np.uint16).tolist()


# --- cutting text without changing its tokens -------------------------------------------------


def test_safe_cuts_never_change_gpt2_tokens():
    enc = GPT2Tokenizer().encoding
    alphabet = list("ab Z9.,!é東🙂'\t\r\n")
    alphabet += ["  ", "\n\n", "'s", "'ll", EOT_TEXT, "\u00a0", "\u3000"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        pieces, carry, start = [], "", 0
        while start < len(text):  # the reader's loop, with blocks of 1 to 8 characters
            step = rng.randint(1, 8)
            block, start = carry + text[start : start + step], start + step
            cut = _safe_cut(block)
            pieces.append(block[:cut])
            carry = block[cut:]
        pieces.append(carry)
        assert "".join(pieces) == text
        expected = enc.encode(text, allowed_special="all")
        assert [t for p in pieces for t in enc.encode(p, allowed_special="all")] == expected, text


def test_safe_cut_points():
    assert _safe_cut("Good night, good") == 11  # before the last space after a non-space
    assert _safe_cut("Exeunt.\n\nROMEO") == 7  # before the newline run, not inside it
    assert _safe_cut("word") == _safe_cut("  ") == _safe_cut("") == 0


def test_text_pieces_decode_utf8_across_blocks(tmp_path, small_pieces):
    text = "café — 東京 🙂 naïve\n" * 500  # multi-byte characters at every block boundary
    path = tmp_path / "u.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(_text_pieces(path))
    assert len(pieces) > 5 and "".join(pieces) == text


def test_text_pieces_name_the_bad_byte(tmp_path, small_pieces):
    path = tmp_path / "latin1.txt"
    path.write_bytes(("Fair is foul " * 1000 + "café").encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text: byte 13003 .*iconv"):
        list(_text_pieces(path))


# --- the same files as chapter 06 -------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
@pytest.mark.parametrize("workers", [1, 3])
def test_one_text_file_gives_chapter_06s_files(tmp_path, text, small_pieces, tokenizer, workers):
    src = tmp_path / "in.txt"
    src.write_text(text + EOT_TEXT + "Next document.\n")  # a literal separator in a text file
    old = prepare(src, tmp_path / "old", tokenizer=tokenizer, block_size=8)
    config = PrepareConfig(tokenizer=tokenizer, block_size=8, unit_chars=3_000, workers=workers)
    new = prepare_corpus(src, tmp_path / "new", config, progress=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()
    same = ("tokenizer", "chars", "vocab_size", "eot", "train_tokens", "val_tokens", "sha256")
    assert {k: new[k] for k in same} == {k: old[k] for k in same}
    assert new["source_sha256"] == old["source_sha256"]  # the file's own sha256
    assert read_meta(tmp_path / "new") == new == verify(tmp_path / "new")
    if tokenizer == "gpt2":
        assert GPT2Tokenizer.eot in _ids(tmp_path / "new", "val")


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_a_folder_is_its_files_joined_by_the_separator(tmp_path, text, small_pieces, tokenizer):
    folder = tmp_path / "books"
    parts = [text[:20_000], text[20_000:45_000], text[45_000:]]
    for i, part in enumerate(parts):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"book{i}.txt").write_text(part)
    (folder / "notes.md").write_text("not read: not .txt")
    joined = tmp_path / "joined.txt"  # sorted order: sub0/book0, sub0/book2, sub1/book1
    separator = EOT_TEXT if tokenizer == "gpt2" else ""
    joined.write_text(separator.join([parts[0], parts[2], parts[1]]))
    old = prepare(joined, tmp_path / "old", tokenizer=tokenizer, block_size=8)
    config = PrepareConfig(tokenizer=tokenizer, block_size=8, unit_chars=3_000)
    new = prepare_corpus(folder, tmp_path / "new", config, progress=False)
    assert new["sha256"] == old["sha256"] and new["documents"] == 3
    assert new["source_sha256"] == old["source_sha256"]


def test_rerun_and_any_number_of_workers_give_the_same_bytes(tmp_path, records):
    src = _write_jsonl(tmp_path / "r.jsonl", records)
    runs = []
    for i, workers in enumerate([1, 4, 2, 4]):
        config = PrepareConfig(block_size=8, unit_chars=500, workers=workers, val_docs=5)
        prepare_corpus(src, tmp_path / f"d{i}", config, progress=False)
        runs.append(_files(tmp_path / f"d{i}"))
    assert all(run == runs[0] for run in runs)


# --- records and Hugging Face datasets --------------------------------------------------------


def _record_stream(records: list[dict]) -> list[int]:
    """The ids the records should become: GPT-2 tokens, documents separated by 50256."""
    tok = GPT2Tokenizer()
    ids = []
    for i, r in enumerate(records):
        ids += ([tok.eot] if i else []) + tok.encoding.encode_ordinary(r["text"])
    return ids


def test_jsonl_records_with_a_validation_split_by_documents(tmp_path, records):
    src = _write_jsonl(tmp_path / "r.jsonl", records)
    config = PrepareConfig(block_size=8, val_docs=3)
    meta = prepare_corpus(src, tmp_path / "d", config, progress=False)
    assert _ids(tmp_path / "d", "val") == _record_stream(records[:3])
    assert _ids(tmp_path / "d", "train") == _record_stream(records[3:])
    assert meta["documents"] == len(records) and meta["val_docs"] == 3
    assert meta["val_fraction"] is None


def test_jsonl_parquet_and_the_datasets_path_agree(neutral, records, monkeypatch):
    tmp_path = neutral
    pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_jsonl(tmp_path / "jsonl" / "part-0.jsonl", records[:30])
    _write_jsonl(tmp_path / "jsonl" / "part-1.jsonl", records[30:])
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(records[:30]), tmp_path / "parquet" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(records[30:]), tmp_path / "parquet" / "part-1.parquet")
    corpora = {
        "jsonl": open_corpus(tmp_path / "jsonl"),
        "parquet": open_corpus(tmp_path / "parquet"),
        "glob": open_corpus(str(tmp_path / "jsonl" / "*.jsonl")),
        "hub path, JSON Lines": hf_corpus(str(tmp_path / "jsonl")),
        "hub path, Parquet": hf_corpus(str(tmp_path / "parquet"), split="train"),
    }
    expected = _record_stream(records)
    for name, corpus in corpora.items():
        out = tmp_path / "out" / name.replace(" ", "_").replace(",", "")
        config = PrepareConfig(block_size=8, unit_chars=2_000, val_fraction=0.25, workers=2)
        meta = prepare_corpus(corpus, out, config, progress=False)
        assert _ids(out, "train") + _ids(out, "val") == expected, name
        assert meta["documents"] == len(records)
    assert datasets is not None


def test_hf_errors_are_one_line(neutral, monkeypatch, records):
    tmp_path = neutral
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write_jsonl(tmp_path / "jsonl" / "part-0.jsonl", records)
    with pytest.raises(ValueError, match="has no field 'content'"):
        prepare_corpus(hf_corpus(str(tmp_path / "jsonl"), text_field="content"), tmp_path / "d")
    with pytest.raises(ValueError, match="Bad split"):
        prepare_corpus(hf_corpus(str(tmp_path / "jsonl"), split="validation"), tmp_path / "d")


def test_hf_corpus_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setattr(corpus_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install datasets"):
        hf_corpus("HuggingFaceFW/fineweb-edu")


def test_records_keep_the_separator_text_as_text_and_survive_surrogates(tmp_path):
    records = [{"text": "a <|endoftext|> b " * 20}, {"text": "bad \ud800 char " * 20}]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))  # "\ud800" stays escaped
    prepare_corpus(src, tmp_path / "d", PrepareConfig(block_size=8), progress=False)
    ids = _ids(tmp_path / "d", "train") + _ids(tmp_path / "d", "val")
    assert ids.count(GPT2Tokenizer.eot) == 1  # only the one between the two documents
    assert "<|endoftext|>" in GPT2Tokenizer().decode(ids[:10])


def test_max_tokens(tmp_path, text, records):
    src = _write_jsonl(tmp_path / "r.jsonl", records)
    meta = prepare_corpus(src, tmp_path / "d", PrepareConfig(block_size=8, max_tokens=1000))
    assert meta["train_tokens"] + meta["val_tokens"] == 1000
    assert (
        _ids(tmp_path / "d", "train") + _ids(tmp_path / "d", "val")
        == (_record_stream(records)[:1000])
    )
    assert meta["source_sha256"] is None and meta["max_tokens"] == 1000
    # The char tokenizer's vocabulary is that of the characters it keeps.
    (tmp_path / "t.txt").write_text("abc" * 100 + "xyz" * 100)
    config = PrepareConfig(tokenizer="char", block_size=8, max_tokens=200, unit_chars=50)
    meta = prepare_corpus(tmp_path / "t.txt", tmp_path / "c", config, progress=False)
    assert meta["chars"] == "abc" and load_tokenizer(tmp_path / "c").decode([0, 1, 2]) == "abc"


def test_batches_read_a_streamed_dataset(tmp_path, records):
    src = _write_jsonl(tmp_path / "r.jsonl", records)
    prepare_corpus(src, tmp_path / "d", PrepareConfig(block_size=16), progress=False)
    x, y = next(Batches(tmp_path / "d", "train", batch_size=4, block_size=16))
    assert x.shape == y.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()


def test_progress_bar_shows_tokens_per_second(tmp_path, text, capsys):
    (tmp_path / "t.txt").write_text(text)
    prepare_corpus(tmp_path / "t.txt", tmp_path / "d", PrepareConfig(block_size=8), progress=True)
    assert "tok/s" in capsys.readouterr().err


# --- mistakes ---------------------------------------------------------------------------------


def test_bad_inputs_say_what_is_wrong(tmp_path, records):
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "missing.txt": "no such file or folder",
        "empty-folder": "a folder without .txt, .jsonl or .parquet files",
        "*.csv": "no file matches",
        "mixed": "mixes text files with records",
        "no-field.jsonl": r"no-field.jsonl:2 has no field 'text': choose --text-field",
        "not-json.jsonl": r"not-json.jsonl:1 is not a JSON record",
        "number.jsonl": r"number.jsonl:1: 'text' holds a int, not text",
        "list.jsonl": r"list.jsonl:1 has no field 'text'",
    }
    (bad / "empty-folder").mkdir()
    (bad / "mixed").mkdir()
    (bad / "mixed" / "a.txt").write_text("hello")
    _write_jsonl(bad / "mixed" / "b.jsonl", records[:2])
    (bad / "no-field.jsonl").write_text('{"text": "fine"}\n{"content": "x"}\n')
    (bad / "not-json.jsonl").write_text("{text: oops}\n")
    (bad / "number.jsonl").write_text('{"text": 5}\n')
    (bad / "list.jsonl").write_text('["text"]\n')
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            prepare_corpus(str(bad / name), tmp_path / "d", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file: give a folder"):
        prepare_corpus(shakespeare_path(), tmp_path / "file", progress=False)


@pytest.mark.parametrize(
    "field, value",
    [
        ("tokenizer", "bpe"),
        ("val_fraction", 1.0),
        ("val_fraction", 0),
        ("val_docs", 0),
        ("max_tokens", 2.5),
        ("block_size", True),
        ("workers", -1),
    ],
)
def test_config_is_checked(field, value):
    with pytest.raises(ValueError, match=f"PrepareConfig.{field}"):
        PrepareConfig(**{field: value})


def test_too_small_keeps_the_previous_dataset(tmp_path, text):
    (tmp_path / "t.txt").write_text(text)
    before = prepare_corpus(tmp_path / "t.txt", tmp_path / "d", SMALL, progress=False)
    files = _files(tmp_path / "d")
    (tmp_path / "t.txt").write_text(text[:500])
    with pytest.raises(ValueError, match=r"too small.*block_size \+ 1 = 1,025"):
        prepare_corpus(tmp_path / "t.txt", tmp_path / "d", progress=False)
    assert _files(tmp_path / "d") == files and verify(tmp_path / "d") == before


def test_verify_notices_a_damaged_token_file(tmp_path, text):
    (tmp_path / "t.txt").write_text(text)
    prepare_corpus(tmp_path / "t.txt", tmp_path / "d", SMALL, progress=False)
    data = bytearray((tmp_path / "d" / "train.bin").read_bytes())
    data[100] ^= 1
    (tmp_path / "d" / "train.bin").write_bytes(bytes(data))
    read_meta(tmp_path / "d")  # same size: only the hash can tell
    with pytest.raises(ValueError, match="train.bin does not match its sha256"):
        verify(tmp_path / "d")


# --- interruptions ----------------------------------------------------------------------------


def test_ctrl_c_keeps_the_old_dataset_and_leaves_no_temporary_files(tmp_path, text):
    (tmp_path / "t.txt").write_text(text)
    before = prepare_corpus(tmp_path / "t.txt", tmp_path / "d", SMALL, progress=False)
    files = _files(tmp_path / "d")

    def documents():
        yield [text[:10_000]]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(Corpus("ctrl-c", documents), tmp_path / "d", SMALL, progress=False)
    assert _files(tmp_path / "d") == files and verify(tmp_path / "d") == before


def test_a_crash_while_publishing_never_looks_complete(tmp_path, text, monkeypatch):
    (tmp_path / "t.txt").write_text(text)
    prepare_corpus(tmp_path / "t.txt", tmp_path / "d", SMALL, progress=False)
    real_replace, calls = os.replace, []

    def die_after_first_rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between two renames
        real_replace(a, b)

    monkeypatch.setattr(prepare_module.os, "replace", die_after_first_rename)
    (tmp_path / "t.txt").write_text(text[:30_000])
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(tmp_path / "t.txt", tmp_path / "d", SMALL, progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not a prepared dataset"):
        read_meta(tmp_path / "d")
    assert not list((tmp_path / "d").glob(".*.tmp"))


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gpt2_book", "prepare", *args]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )


def _children(pid: int) -> list[int]:
    return [
        int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()
    ]


def _wait_for_temp_file(folder: Path, proc: subprocess.Popen, size: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        sizes = [p.stat().st_size for p in folder.glob(".train.bin.*.tmp") if p.exists()]
        if sizes and max(sizes) > size:
            return
        time.sleep(0.02)
    raise AssertionError(f"prepare never got writing: {proc.communicate()}")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_an_interrupted_command_never_leaves_a_dataset_train_accepts(
    tmp_path, text, how, workers, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    Path("big.txt").write_text(text * 150)  # 9 MB: seconds of work on one core
    Path("small.txt").write_text(text)
    config = PrepareConfig(block_size=8, workers=workers)
    before = prepare_corpus("small.txt", "d", config, progress=False)
    args = ["--tokenizer", "gpt2", "--block-size", "8", "--workers", str(workers)]
    run = _cli("--input", "big.txt", *args, "--out-dir", "d", cwd=tmp_path)
    _wait_for_temp_file(tmp_path / "d", run, 100_000)
    pool = _children(run.pid) if sys.platform == "linux" else []
    assert len(pool) == (workers if workers > 1 else 0) or sys.platform != "linux"
    if how == "kill -9":
        run.send_signal(signal.SIGKILL)  # the main process only: its workers must notice
    else:
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C reaches every process of the group
    code = run.wait(60)
    stderr = run.stderr.read().decode()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{c}").exists() for c in pool):
        time.sleep(0.1)
    assert not [c for c in pool if Path(f"/proc/{c}").exists()], "workers outlived prepare"
    assert verify("d") == before  # the old dataset, whole
    temps = list(Path("d").glob(".*.tmp"))
    if how == "ctrl-c":  # one message, from the main process; no worker's traceback
        assert code == 130 and "interrupted" in stderr and "Traceback" not in stderr
        assert not temps
    else:
        assert code == -signal.SIGKILL and temps
    # A rerun cleans up and writes what an uninterrupted run writes.
    prepare_corpus("big.txt", "d", config, progress=False)
    assert not list(Path("d").glob(".*.tmp"))
    prepare_corpus("big.txt", "fresh", config, progress=False)
    assert _files(Path("d")) == _files(Path("fresh"))


def test_stale_temporary_files_of_live_processes_are_kept(tmp_path, text):
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "d").mkdir()
    live = tmp_path / "d" / f".train.bin.{os.getpid()}.tmp"  # a prepare still running
    code = "import os; print(os.getpid())"
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True).stdout)
    dead = tmp_path / "d" / f".val.bin.{pid}.tmp"
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    prepare_module._remove_stale_temps(tmp_path / "d")
    assert live.exists() and not dead.exists()


# --- the command line -------------------------------------------------------------------------


def test_cli_prepares_records_and_datasets(neutral, records, monkeypatch, capsys):
    tmp_path = neutral
    from gpt2_book.__main__ import main

    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "dumps" / "a.jsonl", [{"content": r["text"]} for r in records])
    args = ["--input", "dumps/*.jsonl", "--text-field", "content", "--val-docs", "2"]
    assert main(["prepare", *args, "--tokenizer", "gpt2", "--block-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data/dumps-gpt2: ") and f"{len(records)} document(s)" in out
    assert read_meta(tmp_path / "data" / "dumps-gpt2")["val_docs"] == 2
    assert main(["prepare", "--hf-config", "x"]) == 2
    assert "--hf-config belongs to --hf-dataset" in capsys.readouterr().err
    for wrong in (["--max-tokens", "0"], ["--val-docs", "2", "--val-fraction", "0.2"]):
        with pytest.raises(SystemExit) as exit_:
            main(["prepare", "--input", "dumps", *wrong])
        assert exit_.value.code == 2
    assert main(["prepare", "--input", "dumps/a.jsonl", "--text-field", "text"]) == 2
    assert "has no field 'text'" in capsys.readouterr().err
    assert main(["prepare", "--input", "."]) == 2
    if __import__("importlib").util.find_spec("datasets"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        hub = ["--hf-dataset", str(tmp_path / "dumps"), "--text-field", "content"]
        assert main(["prepare", *hub, "--tokenizer", "gpt2", "--block-size", "8"]) == 0
        assert (tmp_path / "data" / "dumps-gpt2" / "meta.json").is_file()
