"""Tests of the command line (gpt2_book/__main__.py and gpt2_book/cli.py).

Most run in-process through `main(argv)`, which returns the exit code and prints what a user
sees; one smoke test runs `python -m gpt2_book` in a subprocess, as a user would.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_book.__main__ import main
from gpt2_book.data import shakespeare_path

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    *("--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16"),
    *("--batch-size", "4", "--eval-iters", "1", "--eval-interval", "2"),
    *("--device", "cpu", "--no-progress"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with a small text, its prepared dataset and a 3-step run in `run/`."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "small.txt").write_text(shakespeare_path().read_text()[:20_000])
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        assert (
            main(["prepare", "--input", "small.txt", "--out-dir", "data"] + ["--block-size", "16"])
            == 0
        )
        assert main(["train", "--data", "data", "--out-dir", "run", "--max-iters", "3", *TINY]) == 0
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture
def cli(workdir, monkeypatch, capsys):
    """Run `gpt2-book ARGS` in-process in workdir; return (exit code, stdout, stderr)."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / "cache"))

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as done:  # argparse's own exits (--help, bad options)
            code = done.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_smoke_in_a_subprocess(workdir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["sample", "--checkpoint", "run", "--prompt", "ROMEO:", "--max-new-tokens", "5"]
    done = subprocess.run(
        [sys.executable, "-m", "gpt2_book", *args],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROMEO:") and len(done.stdout) == len("ROMEO:") + 5 + 1


@pytest.mark.parametrize("command", [[], ["prepare"], ["train"], ["sample"], ["evaluate"]])
def test_help(command, cli):
    code, out, _ = cli(*command, "--help")
    assert code == 0 and out.startswith("usage: gpt2-book")


def test_every_model_field_is_an_option(cli):
    code, out, _ = cli("train", "--help")
    for flag in ("--head-dim", "--mlp-ratio", "--rope-base", "--pos-encoding", "--n-embd"):
        assert flag in out
    assert "--vocab-size" not in out  # it comes from the data


def test_resume_and_sample(cli, workdir):
    # --resume with no preset continues with the run's own settings, to a new max_iters.
    code, out, err = cli("train", "--out-dir", "run", "--data", "data", "--resume")
    assert code == 0 and "already at step 3" in out, err
    code, out, err = cli(
        "train",
        "--out-dir",
        "run",
        "--data",
        "data",
        "--resume",
        "--max-iters",
        "4",
        "--no-progress",
    )
    assert code == 0, err
    assert "step 4:" in out
    args = ["sample", "--checkpoint", "run", "--prompt", "ROMEO:", "--max-new-tokens", "20"]
    first, again, other = cli(*args), cli(*args), cli(*args, "--seed", "2")
    assert first[0] == 0, first[2]
    assert first[1].startswith("ROMEO:") and len(first[1]) == len("ROMEO:") + 20 + 1
    assert again[1] == first[1]  # seeded
    assert other[1] != first[1]


def test_temperature_zero_is_greedy(cli, workdir):
    """`--temperature 0` gives the argmax continuation, whatever the seed."""
    from gpt2_book.checkpoint import load_model, tokenizer_for

    args = ["sample", "--checkpoint", "run", "--prompt", "ROMEO:", "--max-new-tokens", "8"]
    code, out, err = cli(*args, "--temperature", "0", "--seed", "1")
    assert code == 0, err
    assert cli(*args, "--temperature", "0", "--seed", "2")[1] == out
    model, state = load_model(workdir / "run")
    tok = tokenizer_for(state)
    ids = torch.tensor([tok.encode("ROMEO:")])
    for _ in range(8):  # the greedy loop, written out
        ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out == tok.decode(ids[0].tolist()) + "\n"


def test_evaluate_prints_loss_and_perplexity(cli):
    code, out, err = cli(
        "evaluate", "--checkpoint", "run", "--input", "data/val.bin", "--context", "16"
    )
    assert code == 0, err
    assert "windows of 16 tokens" in out and "perplexity" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "gpt5"], "invalid choice: 'gpt5'"),
        (["train", "--n-layer", "0", "--data", "data"], "n_layer"),
        (["train", "--n-layer", "two"], "invalid int value"),
        (["train", "--data", "nowhere", "--out-dir", "x"], "nowhere"),
        (["train", "--resume", "--out-dir", "nothing-here"], "no checkpoint"),
        (["train", "--learning-rate", "inf", "--data", "data", "--out-dir", "x"], "learning_rate"),
        (["train", "--data", "data", "--out-dir", "small.txt", *TINY], "small.txt"),
        (["train", "--device", "gpu7", "--data", "data"], "'gpu7' is not a device"),
        (["train", "--device", "meta", "--data", "data"], "meta"),
        (["prepare", "--input", "missing.txt"], "missing.txt"),
        (["prepare", "--tokenizer", "bpe"], "invalid choice: 'bpe'"),
        (["prepare", "--input", "binary.dat", "--out-dir", "b"], "UTF-8"),
        (["sample", "--checkpoint", "nowhere"], "no checkpoint"),
        (["sample", "--checkpoint", "fake.pt"], "fake.pt"),
        (["sample", "--temperature", "-1"], "must be a finite number >= 0"),
        (["sample", "--seed", "99999999999999999999999"], "--seed"),
        (["sample", "--checkpoint", "run", "--device", "gpu7"], "'gpu7' is not a device"),
        (["sample", "--checkpoint", "run", "--device", "meta"], "meta"),
        (
            [
                "evaluate",
                "--checkpoint",
                "run",
                "--input",
                "data/val.bin",
                "--context",
                "8",
                "--device",
                "nonsense",
            ],
            "'nonsense' is not a device",
        ),
        (
            [
                "evaluate",
                "--checkpoint",
                "run",
                "--input",
                "data/val.bin",
                "--context",
                "8",
                "--rope-scale",
                "nan",
            ],
            "--rope-scale",
        ),
        (
            ["evaluate", "--checkpoint", "run", "--input", "latin1.txt", "--context", "8"],
            "latin1.txt is not UTF-8",
        ),
        (["train", "--init-from", "missing-folder/", "--data", "data"], "missing-folder"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_code_2(args, message, cli, workdir):
    (workdir / "binary.dat").write_bytes(b"\xff\xfe\x00 not text")
    (workdir / "fake.pt").write_text("not a checkpoint")
    (workdir / "latin1.txt").write_bytes("Ça va très bien, merci.".encode("latin-1"))
    code, _, err = cli(*args)
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def hf_folder(workdir) -> Path:
    """A small random GPT-2 in Hugging Face's format, written by transformers itself."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    folder = workdir / "hf-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_fine_tune_from_a_hugging_face_folder(cli, hf_folder):
    from gpt2_book.checkpoint import load_model
    from gpt2_book.pretrained import from_pretrained

    code, _, err = cli("prepare", "--input", "small.txt", "--tokenizer", "gpt2", "--out-dir", "bpe")
    assert code == 0, err
    common = ["--data", "bpe", "--block-size", "32", "--batch-size", "2", "--no-progress"]
    common += ["--eval-interval", "2", "--eval-iters", "1", "--device", "cpu"]
    code, out, err = cli(
        "train", "--init-from", str(hf_folder), "--out-dir", "ft", "--max-iters", "2", *common
    )
    assert code == 0, err
    # Step 0's evaluation ran on the pretrained weights; the checkpoint holds them trained on.
    model, state = load_model("ft")
    start = from_pretrained(hf_folder)
    assert model.config.n_embd == 32 and model.config.pos_encoding == "learned"
    assert model.config.block_size == 32
    assert not torch.equal(
        model.transformer.h[0].attn.c_attn.weight, start.transformer.h[0].attn.c_attn.weight
    )
    code, out, err = cli("train", "--out-dir", "ft", "--resume", "--max-iters", "3", *common)
    assert code == 0 and "step 3:" in out, err
    code, out, err = cli(
        "sample",
        "--checkpoint",
        str(hf_folder),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
    )
    assert code == 0 and out.startswith("Hello"), err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-embd", "64"], "--n-embd 64 contradicts the weights"),
        (["--block-size", "128"], "block_size=128"),
        (["--data", "data"], "tokenizer"),  # character-level data
    ],
)
def test_fine_tune_mistakes(extra, message, cli, hf_folder):
    args = ["train", "--init-from", str(hf_folder), "--out-dir", "bad", "--max-iters", "1"]
    if "--data" not in extra:
        args += ["--data", "bpe"]
    code, _, err = cli(*args, *extra, "--no-progress", "--device", "cpu")
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
