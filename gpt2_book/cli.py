"""What the commands of ``python -m gpt2_book`` do, once their arguments are parsed.

Hand-written, not exported from a chapter: each function only calls the package (chapters 06
to 12) and prints a short report; `gpt2_book/__main__.py` parses the arguments and turns
errors into one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

DEFAULT_PRESET = "shakespeare-char-cpu"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2-book"


def _shipped_data(block_size: int, tokenizer: str = "char") -> Path:
    """The shipped corpus, prepared once into the user's cache folder."""
    from gpt2_book.data import prepare, read_meta

    data_dir = _cache_dir() / f"shakespeare-{tokenizer}"
    if os.environ.get("LOCAL_RANK", "0") == "0":
        prepare(None, data_dir, tokenizer=tokenizer, block_size=block_size)
        return data_dir
    for _ in range(600):  # under torchrun, the other processes wait for local rank 0's files
        try:
            read_meta(data_dir)
            return data_dir
        except ValueError:
            time.sleep(0.5)
    raise ValueError(f"timed out waiting for local rank 0 to prepare {data_dir}")


def _dataset_name(args: argparse.Namespace) -> str:
    """The default --out-dir's stem: the input's name, or the dataset's and its config."""
    if args.hf_dataset:
        return "-".join(filter(None, [Path(args.hf_dataset).name, args.hf_config]))
    if not args.input:
        return "shakespeare"
    path = Path(args.input)
    if any(c in path.name for c in "*?["):  # a glob pattern: name it after its folder
        return path.parent.name or "corpus"
    return path.stem


def prepare_command(args: argparse.Namespace) -> int:
    import sys

    from gpt2_book.corpus import hf_corpus, open_corpus
    from gpt2_book.data import shakespeare_path
    from gpt2_book.prepare import PrepareConfig, prepare_corpus

    if args.hf_config and not args.hf_dataset:
        raise ValueError("--hf-config belongs to --hf-dataset")
    if args.hf_dataset:
        corpus = hf_corpus(
            args.hf_dataset, config=args.hf_config, split=args.split, text_field=args.text_field
        )
    else:
        corpus = open_corpus(args.input or shakespeare_path(), text_field=args.text_field)
    if args.out_dir is None:
        args.out_dir = Path("data") / f"{_dataset_name(args)}-{args.tokenizer}"
    config = PrepareConfig(
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        val_docs=args.val_docs,
        max_tokens=args.max_tokens,
        block_size=args.block_size,
        workers=args.workers,
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        meta = prepare_corpus(corpus, args.out_dir, config, progress=progress)
    except KeyboardInterrupt:
        print(f"gpt2-book prepare: interrupted; {args.out_dir} is as it was", file=sys.stderr)
        return 130
    print(
        f"{args.out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
        f"vocabulary of {meta['vocab_size']:,} ({args.tokenizer}), "
        f"{meta['documents']:,} document(s)"
    )
    return 0


def _config(args: argparse.Namespace):
    """The TrainConfig of a `train` command: preset (or resumed run) plus field overrides."""
    from gpt2_book.checkpoint import load_checkpoint
    from gpt2_book.gpt import GPTConfig
    from gpt2_book.train import TrainConfig

    overrides = {name: getattr(args, name) for name in override_names() if hasattr(args, name)}
    if args.resume and args.preset is None:  # continue with the settings the run started with
        saved = load_checkpoint(args.out_dir)["train_config"]
        return TrainConfig.from_dict(saved).replace(**overrides)
    preset = args.preset or ("gpt2-finetune" if args.init_from else DEFAULT_PRESET)
    if not args.init_from:
        return TrainConfig.from_preset(preset, **overrides)
    # Fine-tuning: the weights decide the model's shape; the options only the run's settings.
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    run_overrides = {k: v for k, v in overrides.items() if k not in model_fields}
    return fit_to_weights(TrainConfig.from_preset(preset, **run_overrides), args, overrides)


def fit_to_weights(config, args: argparse.Namespace, overrides: dict):
    """The config of a fine-tuning run: the pretrained model's shape, the run's own dropout
    and (shorter) block_size. Loads the weights into `args.weights`. A shape option that
    contradicts the weights is an error."""
    from gpt2_book.pretrained import from_pretrained

    dropout = overrides.get("dropout", config.model.dropout)
    args.weights = from_pretrained(args.init_from, dropout=dropout)
    have = args.weights.config
    for name, value in overrides.items():
        if name in ("block_size", "dropout") or not hasattr(have, name):
            continue
        if value != getattr(have, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {value} contradicts the weights of {args.init_from}, which have "
                f"{name}={getattr(have, name)!r}: drop {flag}"
            )
    block_size = overrides.get("block_size", min(config.model.block_size, have.block_size))
    model = dataclasses.replace(have, dropout=dropout, block_size=block_size)
    return config.replace(model=model)


def train_command(args: argparse.Namespace) -> int:
    from gpt2_book.trainer import train

    if args.out_dir is None:
        args.out_dir = Path("out") / (
            args.preset or ("gpt2-finetune" if args.init_from else DEFAULT_PRESET)
        )
    args.weights = None
    config = _config(args)
    tokenizer = "gpt2" if args.init_from else "char"
    data_dir = Path(args.data) if args.data else _shipped_data(config.model.block_size, tokenizer)
    result = train(
        config,
        data_dir,
        args.out_dir,
        resume=args.resume,
        progress=args.progress,
        init_from=None if args.resume else args.weights,
        allow_new_data=args.allow_new_data,
    )
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


def _load(source: str, device: str | None):
    """A model and its tokenizer from a training checkpoint (a folder or its ckpt.pt), a
    Hugging Face-format folder (config.json + model.safetensors), or a GPT-2 hub name."""
    from gpt2_book.checkpoint import CHECKPOINT_NAME, load_model, tokenizer_for
    from gpt2_book.data import GPT2Tokenizer
    from gpt2_book.pretrained import HUB_NAMES, from_pretrained
    from gpt2_book.utils import resolve_device

    path = Path(source)
    pretrained = (path / "config.json").is_file() and not (path / CHECKPOINT_NAME).exists()
    if pretrained or (not path.exists() and (source in HUB_NAMES or source.count("/") == 1)):
        device = resolve_device(device)  # before the download, not after
        return from_pretrained(source).to(device).eval(), GPT2Tokenizer()
    model, state = load_model(path, device=device)  # None: the default device
    return model, tokenizer_for(state)


def sample_command(args: argparse.Namespace) -> int:
    import torch

    from gpt2_book.generate import decode_layout, generate

    model, tokenizer = _load(args.checkpoint, args.device)
    device = next(model.parameters()).device
    if device.type == "cpu":  # measured faster for one-token steps on CPU only (chapter 09)
        decode_layout(model)
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


def evaluate_command(args: argparse.Namespace) -> int:
    import torch

    from gpt2_book.evaluate import load_tokens, loss_per_position, perplexity, rescale_rope

    if (args.hellaswag is None) == (args.input is None) or (args.input and not args.context):
        raise ValueError("give --input and --context, or --hellaswag FILE")
    model, tokenizer = _load(args.checkpoint, args.device)
    if args.hellaswag is not None:
        return _hellaswag(model, tokenizer, args)
    if args.rope_scale is not None or args.rope_base is not None:
        model = rescale_rope(model, scale=args.rope_scale or 1.0, base=args.rope_base)
    if args.input.suffix == ".bin":  # token ids written by `prepare`
        tokens = load_tokens(args.input)
    else:  # text, tokenized as the model was trained
        tokens = torch.tensor(tokenizer.encode(_read_text(args.input)), dtype=torch.long)
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


def _hellaswag(model, tokenizer, args: argparse.Namespace) -> int:
    import sys

    from gpt2_book.hellaswag import hellaswag, read_hellaswag

    items = read_hellaswag(args.hellaswag)
    scores = hellaswag(model, items, tokenizer, limit=args.max_items, progress=sys.stderr.isatty())
    print(
        f"{args.hellaswag}: {scores['items']:,} items: acc {scores['acc']:.4f}, "
        f"acc_norm {scores['acc_norm']:.4f} (chance: 0.25)"
    )
    return 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 ({err.reason} at byte {err.start}): convert it first, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > {path.stem}-utf8{path.suffix}`"
        ) from None


def override_fields() -> list:
    """The settings `train` takes as options: the run's and the model's (vocab_size comes
    from the data), each with its type hint resolved."""
    import typing

    from gpt2_book.gpt import GPTConfig
    from gpt2_book.train import TrainConfig

    found = []
    for cls, skip in ((TrainConfig, "model"), (GPTConfig, "vocab_size")):
        hints = typing.get_type_hints(cls)
        found += [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.name != skip]
    return found


def override_names() -> list[str]:
    return [name for name, _ in override_fields()]
