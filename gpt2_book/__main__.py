"""The command line: ``python -m gpt2_book`` (or ``gpt2-book``) prepare / train / sample /
evaluate.

Hand-written, not exported from a chapter: this file parses the arguments and `gpt2_book.cli`
runs the commands, which only call the package that the chapters explain. Mistakes in the
arguments, the files or the settings end with one line on stderr and exit code 2, never a
traceback; an interrupted training run exits with 130 (Ctrl-C) or 143 (SIGTERM).

    gpt2-book                     # = gpt2-book train: the CPU preset on the shipped Shakespeare
    gpt2-book prepare --input my.txt --tokenizer gpt2 --out-dir data/mine
    gpt2-book train --preset shakespeare-char --data data/mine --out-dir out/mine
    gpt2-book train --init-from gpt2 --data data/mine-gpt2     # fine-tune OpenAI's GPT-2
    gpt2-book sample --checkpoint out/mine --prompt "ROMEO:"
    gpt2-book sample --checkpoint gpt2 --prompt "Hello" --temperature 0
    gpt2-book evaluate --checkpoint out/mine --input data/mine/val.bin --context 256
    torchrun --standalone --nproc_per_node=8 -m gpt2_book train --preset gpt2-small ...
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import get_args as typing_args

from gpt2_book import cli


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: what is wrong, and where help is."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind: type, *, zero: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a finite number > 0 (>= 0 with zero=True)."""

    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>= 0' if zero else '> 0'}, not {text}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    """One --option per setting; only the options given override the preset."""
    group = parser.add_argument_group(
        "overrides",
        "Any TrainConfig or GPTConfig field; each replaces the preset's value "
        "(see chapters 05 and 07).",
    )
    for name, kind in cli.override_fields():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS
            )
            continue
        if isinstance(kind, types.UnionType):  # `int | None` (head_dim), `str | None` (device)
            kind = next(k for k in typing_args(kind) if k is not type(None))
        if kind not in (int, float):
            kind = str
        group.add_argument(
            flag, dest=name, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper()
        )


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    from gpt2_book.data import TOKENIZERS
    from gpt2_book.train import PRESET_NAMES

    parser = _Parser(
        prog="gpt2-book",
        description="Prepare data, train a GPT, sample from it, evaluate it.",
        epilog="With no command at all, runs `train` with its defaults.",
    )
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    prep = commands.add_parser(
        "prepare",
        help="tokenize text for training: a file, a folder, JSON Lines, Parquet, a HF dataset",
    )
    source = prep.add_mutually_exclusive_group()
    source.add_argument(
        "--input",
        help="a UTF-8 text file, a folder or a glob pattern of .txt, .jsonl or .parquet files "
        "(default: the shipped Shakespeare)",
    )
    source.add_argument(
        "--hf-dataset",
        metavar="NAME",
        help="a Hugging Face dataset, streamed, e.g. HuggingFaceFW/fineweb-edu "
        "(needs `pip install datasets`)",
    )
    prep.add_argument("--hf-config", metavar="NAME", help="its configuration, e.g. sample-10BT")
    prep.add_argument("--split", default="train", help="its split (default: train)")
    prep.add_argument(
        "--text-field", default="text", help="the field of a record that holds its text"
    )
    prep.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    prep.add_argument("--out-dir", type=Path, help="default: data/<input name>-<tokenizer>")
    val = prep.add_mutually_exclusive_group()
    val.add_argument(
        "--val-fraction",
        type=_positive(float),
        default=0.1,
        help="share of the token stream, from its end, kept for validation (default 0.1)",
    )
    val.add_argument(
        "--val-docs",
        type=_positive(int),
        metavar="N",
        help="instead, the first N documents make the validation split",
    )
    prep.add_argument("--max-tokens", type=_positive(int), metavar="N", help="stop after N tokens")
    prep.add_argument(
        "--block-size",
        type=_positive(int),
        default=256,
        help="longest context to be trained on; checks the text is long enough",
    )
    prep.add_argument(
        "--workers", type=_positive(int), help="processes that tokenize (default: every core)"
    )
    prep.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    prep.set_defaults(func=cli.prepare_command)

    tr = commands.add_parser("train", help="train a model (default: CPU preset, Shakespeare)")
    tr.add_argument("--preset", choices=PRESET_NAMES, help=f"default {cli.DEFAULT_PRESET}")
    tr.add_argument("--out-dir", type=Path, help="default: out/<preset>")
    tr.add_argument(
        "--data",
        type=Path,
        help="a folder written by `prepare` (default: the shipped Shakespeare, char-level, cached)",
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    tr.add_argument(
        "--init-from",
        metavar="WEIGHTS",
        help="fine-tune OpenAI's GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging "
        "Face-format folder (default preset then: gpt2-finetune; data: GPT-2 tokens)",
    )
    tr.add_argument(
        "--allow-new-data",
        action="store_true",
        help="with --resume: continue on other data of the same vocabulary",
    )
    tr.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar",
    )
    _add_overrides(tr)
    tr.set_defaults(func=cli.train_command)

    sa = commands.add_parser("sample", help="generate text from a checkpoint")
    sa.add_argument(
        "--checkpoint",
        default=str(Path("out") / cli.DEFAULT_PRESET),
        help="a training out dir or its ckpt.pt; or GPT-2 weights: gpt2, gpt2-medium, "
        "gpt2-large, gpt2-xl, or a Hugging Face-format folder",
    )
    sa.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sa.add_argument("--max-new-tokens", type=_positive(int), default=500)
    sa.add_argument(
        "--temperature", type=_positive(float, zero=True), default=0.8, help="0: greedy"
    )
    sa.add_argument("--top-k", type=_positive(int), default=200)
    sa.add_argument(
        "--top-p",
        type=float,
        help="nucleus sampling: keep the likeliest tokens "
        "up to this probability mass, in (0, 1] (default: off)",
    )
    sa.add_argument("--seed", type=_seed, default=1337)
    sa.add_argument("--device", help="default: CUDA, then MPS, then CPU")
    sa.set_defaults(func=cli.sample_command)

    ev = commands.add_parser("evaluate", help="loss per position and perplexity of a checkpoint")
    ev.add_argument(
        "--checkpoint",
        required=True,
        help="a training out dir or ckpt.pt; or gpt2, gpt2-medium, ... or a Hugging Face folder",
    )
    ev.add_argument(
        "--input",
        type=Path,
        help="a token file from `prepare` (e.g. val.bin), or a UTF-8 text file",
    )
    ev.add_argument("--context", type=_positive(int), help="window length T (with --input)")
    ev.add_argument(
        "--hellaswag",
        type=Path,
        metavar="FILE",
        help="instead of --input: score HellaSwag items, e.g. hellaswag_val.jsonl",
    )
    ev.add_argument(
        "--max-items", type=_positive(int), metavar="N", help="with --hellaswag: the first N"
    )
    ev.add_argument(
        "--window",
        type=_positive(int),
        help="sliding window: each prediction sees only its last N tokens "
        "(default: the whole context; block_size for learned positions)",
    )
    ev.add_argument(
        "--rope-scale",
        type=_positive(float),
        help="RoPE position scale, e.g. trained length / context",
    )
    ev.add_argument("--rope-base", type=_positive(float), help="a new RoPE base")
    ev.add_argument("--batch-size", type=_positive(int), default=16)
    ev.add_argument("--max-windows", type=_positive(int), help="default: all")
    ev.add_argument("--device", help="default: CUDA, then MPS, then CPU")
    ev.set_defaults(func=cli.evaluate_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `gpt2-book` and `python -m gpt2_book`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv or ["train"])
    if args.command is None:
        parser.error("choose a command: prepare, train, sample or evaluate")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gpt2_book.checkpoint import CheckpointError
    from gpt2_book.trainer import TrainingDiverged, TrainingInterrupted

    try:
        return args.func(args)
    except (ValueError, TypeError, CheckpointError, OSError) as err:  # data, files, settings
        message = " ".join(str(err).split())
        print(f"gpt2-book {args.command}: error: {message}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"gpt2-book train: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:  # SIGINT / SIGTERM during training, handled there
        print(f"gpt2-book train: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"gpt2-book {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
