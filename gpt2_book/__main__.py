"""The command line: ``python -m gpt2_book`` (or ``gpt2-book``) prepare / train / sample /
evaluate.

Hand-written, not exported from a chapter: it only parses arguments and calls the package
(`gpt2_book.data.prepare`, `gpt2_book.train.train`, `gpt2_book.train.load_model`,
`gpt2_book.evaluate.loss_per_position`), which the chapters `06_data`, `07_training` and
`09_experiments` explain. Mistakes in the arguments, the files or the
settings end with one line on stderr and exit code 2, never a traceback.

    gpt2-book                     # = gpt2-book train: the CPU preset on the shipped Shakespeare
    gpt2-book prepare --input my.txt --tokenizer gpt2 --out-dir data/mine
    gpt2-book train --preset shakespeare-char --data data/mine --out-dir out/mine
    gpt2-book sample --checkpoint out/mine --prompt "ROMEO:"
    gpt2-book evaluate --checkpoint out/mine --input data/mine/val.bin --context 256
    torchrun --standalone --nproc_per_node=8 -m gpt2_book train --preset gpt2-small ...
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

DEFAULT_PRESET = "shakespeare-char-cpu"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: what is wrong, and where help is."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2-book"


def _shipped_data(block_size: int) -> Path:
    """The shipped corpus, character-level, prepared once into the user's cache folder."""
    from gpt2_book.data import prepare, read_meta

    data_dir = _cache_dir() / "shakespeare-char"
    if os.environ.get("LOCAL_RANK", "0") == "0":
        prepare(None, data_dir, tokenizer="char", block_size=block_size)
        return data_dir
    for _ in range(600):  # under torchrun, the other processes wait for local rank 0's files
        try:
            read_meta(data_dir)
            return data_dir
        except ValueError:
            time.sleep(0.5)
    raise ValueError(f"timed out waiting for local rank 0 to prepare {data_dir}")


def _prepare(args: argparse.Namespace) -> int:
    from gpt2_book.data import prepare

    if args.out_dir is None:
        stem = Path(args.input).stem if args.input else "shakespeare"
        args.out_dir = Path("data") / f"{stem}-{args.tokenizer}"
    meta = prepare(args.input, args.out_dir, args.tokenizer, args.val_fraction, args.block_size)
    print(
        f"{args.out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
        f"vocabulary of {meta['vocab_size']:,} ({args.tokenizer})"
    )
    return 0


def _config(args: argparse.Namespace):
    """The TrainConfig of a `train` command: preset (or resumed run) plus field overrides."""
    from gpt2_book.train import TrainConfig, load_checkpoint

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    overrides = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if args.resume and args.preset is None:  # continue with the settings the run started with
        saved = load_checkpoint(args.out_dir)["train_config"]
        return dataclasses.replace(TrainConfig(**saved), **overrides)
    return TrainConfig.from_preset(args.preset or DEFAULT_PRESET, **overrides)


def _train(args: argparse.Namespace) -> int:
    from gpt2_book.train import train

    if args.out_dir is None:
        args.out_dir = Path("out") / (args.preset or DEFAULT_PRESET)
    config = _config(args)
    data_dir = Path(args.data) if args.data else _shipped_data(config.block_size)
    result = train(config, data_dir, args.out_dir, resume=args.resume, progress=args.progress)
    if os.environ.get("RANK", "0") != "0":
        return 0
    if not result.evals:
        print(f"{args.out_dir} is already at step {result.iters}: raise --max-iters to go on")
    else:
        last = result.evals[-1]
        print(
            f"step {last['iter']}: train loss {last['train_loss']:.4f}, "
            f"val loss {last['val_loss']:.4f}; checkpoint in {args.out_dir}\n"
            f"sample from it with: python -m gpt2_book sample --checkpoint {args.out_dir}"
        )
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from gpt2_book.checkpoint import load_model, tokenizer_for
    from gpt2_book.generate import generate

    model, state = load_model(args.checkpoint, device=args.device)  # None: the default device
    device = next(model.parameters()).device
    tokenizer = tokenizer_for(state)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty: give at least one character")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out = generate(
        model,
        idx,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
    )
    print(tokenizer.decode(out[0].tolist()))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from gpt2_book.checkpoint import load_model, tokenizer_for
    from gpt2_book.evaluate import load_tokens, loss_per_position, perplexity, rescale_rope

    model, state = load_model(args.checkpoint, device=args.device)  # None: the default device
    if args.rope_scale is not None or args.rope_base is not None:
        model = rescale_rope(model, scale=args.rope_scale or 1.0, base=args.rope_base)
    if args.input.suffix == ".bin":  # token ids written by `prepare`
        tokens = load_tokens(args.input)
    else:  # text, tokenized as the model was trained
        text = args.input.read_text(encoding="utf-8")
        tokens = torch.tensor(tokenizer_for(state).encode(text), dtype=torch.long)
    losses = loss_per_position(
        model,
        tokens,
        args.context,
        window=args.window,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
    )
    n = min((len(tokens) - 1) // args.context, args.max_windows or len(tokens))
    print(
        f"{args.input}: {n:,} windows of {args.context} tokens: mean loss "
        f"{losses.mean():.4f}, perplexity {perplexity(losses):.2f}"
    )
    trained = model.config.block_size
    if args.context > trained:
        print(
            f"positions < {trained} (trained length): {losses[:trained].mean():.4f}; "
            f"positions >= {trained}: {losses[trained:].mean():.4f}"
        )
    return 0


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    """One --option per TrainConfig field; only the options given override the preset."""
    from gpt2_book.train import TrainConfig

    group = parser.add_argument_group(
        "overrides", "Any TrainConfig field; each replaces the preset's value (see the chapter)."
    )
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), f.type
        if kind is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS
            )
            continue
        if isinstance(kind, types.UnionType) or kind not in (int, float):
            kind = str  # only `device: str | None` and plain strings
        group.add_argument(
            flag, dest=f.name, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper()
        )


def _parser() -> argparse.ArgumentParser:
    from gpt2_book.data import TOKENIZERS
    from gpt2_book.train import PRESET_NAMES

    parser = _Parser(
        prog="gpt2-book",
        description="Prepare data, train a GPT, sample from it, evaluate it.",
        epilog="With no command at all, runs `train` with its defaults.",
    )
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    prep = commands.add_parser("prepare", help="tokenize a text file for training")
    prep.add_argument("--input", help="UTF-8 text file (default: the shipped Shakespeare)")
    prep.add_argument("--tokenizer", choices=TOKENIZERS, default="char")
    prep.add_argument("--out-dir", type=Path, help="default: data/<input name>-<tokenizer>")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="default 0.1")
    prep.add_argument(
        "--block-size",
        type=_positive(int),
        default=256,
        help="longest context to be trained on; checks the text is long enough",
    )
    prep.set_defaults(func=_prepare)

    tr = commands.add_parser("train", help="train a model (default: CPU preset, Shakespeare)")
    tr.add_argument("--preset", choices=PRESET_NAMES, help=f"default {DEFAULT_PRESET}")
    tr.add_argument("--out-dir", type=Path, help="default: out/<preset>")
    tr.add_argument(
        "--data",
        type=Path,
        help="a folder written by `prepare` (default: the shipped Shakespeare, char-level, cached)",
    )
    tr.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    tr.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar",
    )
    _add_overrides(tr)
    tr.set_defaults(func=_train)

    sa = commands.add_parser("sample", help="generate text from a checkpoint")
    sa.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("out") / DEFAULT_PRESET,
        help="a training out dir or its ckpt.pt",
    )
    sa.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sa.add_argument("--max-new-tokens", type=_positive(int), default=500)
    sa.add_argument("--temperature", type=_positive(float), default=0.8)
    sa.add_argument("--top-k", type=_positive(int), default=200)
    sa.add_argument(
        "--top-p",
        type=float,
        help="nucleus sampling: keep the likeliest tokens "
        "up to this probability mass, in (0, 1] (default: off)",
    )
    sa.add_argument("--seed", type=int, default=1337)
    sa.add_argument("--device", help="default: CUDA, then MPS, then CPU")
    sa.set_defaults(func=_sample)

    ev = commands.add_parser("evaluate", help="loss per position and perplexity of a checkpoint")
    ev.add_argument("--checkpoint", type=Path, required=True, help="a training out dir or ckpt.pt")
    ev.add_argument(
        "--input",
        type=Path,
        required=True,
        help="a token file from `prepare` (e.g. val.bin), or a UTF-8 text file",
    )
    ev.add_argument("--context", type=_positive(int), required=True, help="window length T")
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
    ev.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `gpt2-book` and `python -m gpt2_book`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv or ["train"])
    if args.command is None:
        parser.error("choose a command: prepare, train, sample or evaluate")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from gpt2_book.train import CheckpointError, TrainingDiverged

    try:
        return args.func(args)
    except (ValueError, CheckpointError, OSError) as err:  # the user's data, files, settings
        message = " ".join(str(err).split())
        print(f"gpt2-book {args.command}: error: {message}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"gpt2-book train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "gpt2-book: interrupted; `train --resume` continues from the last checkpoint",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
