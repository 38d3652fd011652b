"""Tests of the command line (gpt2_book/__main__.py), run as a user would: in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_book.data import shakespeare_path

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "16",
    "--block-size",
    "16",
    "--batch-size",
    "4",
    "--eval-iters",
    "1",
    "--eval-interval",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]


def gpt2_book(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "XDG_CACHE_HOME": str(cwd / "cache"),  # the shipped corpus is prepared here
    }
    cmd = [sys.executable, "-m", "gpt2_book", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "small.txt").write_text(shakespeare_path().read_text()[:20_000])
    return folder


@pytest.mark.parametrize("command", [[], ["prepare"], ["train"], ["sample"]])
def test_help(command, workdir):
    done = gpt2_book(*command, "--help", cwd=workdir)
    assert done.returncode == 0 and done.stdout.startswith("usage: gpt2-book")


def test_prepare_train_resume_sample(workdir):
    done = gpt2_book(
        "prepare", "--input", "small.txt", "--out-dir", "data", "--block-size", "16", cwd=workdir
    )
    assert done.returncode == 0, done.stderr
    assert "18,000 train and 2,000 val tokens" in done.stdout
    done = gpt2_book(
        "train", "--data", "data", "--out-dir", "run", "--max-iters", "3", *TINY, cwd=workdir
    )
    assert done.returncode == 0, done.stderr
    assert "step 3:" in done.stdout and (workdir / "run" / "ckpt.pt").is_file()
    # --resume with no preset continues with the run's own settings, to a new max_iters.
    done = gpt2_book(
        "train",
        "--out-dir",
        "run",
        "--data",
        "data",
        "--resume",
        "--max-iters",
        "4",
        "--no-progress",
        cwd=workdir,
    )
    assert done.returncode == 0, done.stderr
    assert "step 4:" in done.stdout
    args = ["sample", "--checkpoint", "run", "--prompt", "ROMEO:", "--max-new-tokens", "20"]
    first, again = gpt2_book(*args, cwd=workdir), gpt2_book(*args, cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("ROMEO:") and len(first.stdout) == len("ROMEO:") + 20 + 1
    assert again.stdout == first.stdout  # seeded
    other = gpt2_book(*args, "--seed", "2", cwd=workdir)
    assert other.stdout != first.stdout


def test_train_with_no_options_uses_the_cpu_preset_and_the_shipped_corpus(tmp_path):
    # A newcomer runs `python -m gpt2_book train` (or no command); we stop it after 2 steps.
    done = gpt2_book("--max-iters", "2", "--eval-iters", "1", "--no-progress", cwd=tmp_path)
    assert done.returncode == 2  # options need the command ...
    done = gpt2_book(
        "train", "--max-iters", "2", "--eval-iters", "1", "--no-progress", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "shakespeare-char-cpu" / "ckpt.pt").is_file()
    assert (tmp_path / "cache" / "gpt2-book" / "shakespeare-char" / "meta.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "gpt5"], "invalid choice: 'gpt5'"),
        (["train", "--n-layer", "0", "--data", "data"], "TrainConfig.n_layer = 0"),
        (["train", "--n-layer", "two"], "invalid int value"),
        (["train", "--data", "nowhere", "--out-dir", "x"], "not a prepared dataset"),
        (["train", "--resume", "--out-dir", "nothing-here"], "no checkpoint"),
        (["prepare", "--input", "missing.txt"], "no such file"),
        (["prepare", "--tokenizer", "bpe"], "invalid choice: 'bpe'"),
        (["prepare", "--input", "binary.dat", "--out-dir", "b"], "is not UTF-8"),
        (["sample", "--checkpoint", "nowhere"], "no checkpoint"),
        (["sample", "--checkpoint", "fake.pt"], "not a PyTorch checkpoint"),
        (["sample", "--temperature", "-1"], "must be positive"),
        (["sample", "--checkpoint", "nowhere", "--device", "gpu7"], "'gpu7' is not a device"),
        (["train", "--device", "gpu7"], "TrainConfig.device = 'gpu7'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_code_2(args, message, workdir):
    (workdir / "binary.dat").write_bytes(b"\xff\xfe\x00 not text")
    (workdir / "fake.pt").write_text("not a checkpoint")
    done = gpt2_book(*args, cwd=workdir)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
