"""gpt2_book.hellaswag: reading, rendering and scoring HellaSwag items, checked against
Hugging Face's GPT2LMHeadModel on the same random weights."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_book.data import CharTokenizer, GPT2Tokenizer
from gpt2_book.gpt import GPT
from gpt2_book.hellaswag import ending_losses, hellaswag, read_hellaswag, render
from gpt2_book.pretrained import from_pretrained

# Hand-written items in the format of hellaswag_val.jsonl (the first is build-nanogpt's example).
ITEMS = [
    {
        "ind": 24,
        "ctx": "A man is sitting on a roof. he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": 3,
    },
    {
        "ctx": "A woman pours water into a glass. She",
        "endings": ["drinks it.", "paints the glass blue and", "runs.", "sings a song to it"],
        "label": 0,
    },
    {
        "ctx": "The chef slices an onion on a board, then",
        "endings": [
            "puts the slices in a hot pan.",
            "a dog.",
            "throws the board out of the window of the car that drives past.",
            "sleeps",
        ],
        "label": 0,
    },
]


def _write(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[GPT2LMHeadModel, GPT]:
    """A small GPT-2-shaped model with random weights, in Hugging Face's class and in ours."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    hf = GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    hf.save_pretrained(folder)
    return hf, from_pretrained(folder).eval()


def test_read_checks_every_item(tmp_path):
    assert list(read_hellaswag(_write(tmp_path / "ok.jsonl", ITEMS))) == ITEMS
    with pytest.raises(ValueError, match="no such file"):
        list(read_hellaswag(tmp_path / "missing.jsonl"))
    bad = [
        {"ctx": "x", "endings": ["a", "b", "c"], "label": 0},
        {"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4},
        {"ctx": "x", "endings": ["a", "b", "c", "d"], "label": "0"},
        {"ctx": 3, "endings": ["a", "b", "c", "d"], "label": 0},
        ["not", "a", "dict"],
    ]
    for item in bad:
        path = _write(tmp_path / "bad.jsonl", [ITEMS[0], item])
        with pytest.raises(ValueError, match=r"bad.jsonl:2 is not a HellaSwag item"):
            list(read_hellaswag(path))
    (tmp_path / "broken.jsonl").write_text('{"ctx": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1 is not a JSON record"):
        list(read_hellaswag(tmp_path / "broken.jsonl"))


def test_render_rows_and_mask():
    tok = GPT2Tokenizer()
    tokens, mask = render(ITEMS[0], tok, block_size=1024)
    context = tok.encode(ITEMS[0]["ctx"])
    assert tokens.shape == mask.shape and tokens.shape[0] == 4
    for row, ending in enumerate(ITEMS[0]["endings"]):
        end = tok.encode(" " + ending)
        n = len(context) + len(end)
        assert tokens[row, :n].tolist() == context + end
        assert mask[row].tolist() == [False] * len(context) + [True] * len(end) + [False] * (
            tokens.shape[1] - n
        )
    # A context too long for the model loses its oldest tokens, never the ending.
    short, short_mask = render(ITEMS[0], tok, block_size=12)
    assert short.shape[1] == 12
    for row, ending in enumerate(ITEMS[0]["endings"]):
        end = tok.encode(" " + ending)
        kept = min(len(end), 11)
        length = min(len(context) + len(end), 12)
        assert short[row, length - kept : length].tolist() == end[-kept:]
        assert short_mask[row].sum() == kept


def test_ending_losses_are_the_mean_cross_entropy_of_the_ending():
    torch.manual_seed(0)
    tokens, mask = render(ITEMS[1], GPT2Tokenizer(), block_size=1024)
    logits = torch.randn(*tokens.shape, 50257)
    total, mean = ending_losses(logits, tokens, mask)
    for row in range(4):
        positions = [t for t in range(1, tokens.shape[1]) if mask[row, t]]
        losses = [F.cross_entropy(logits[row, t - 1], tokens[row, t]) for t in positions]
        torch.testing.assert_close(total[row], torch.stack(losses).sum())
        torch.testing.assert_close(mean[row], torch.stack(losses).mean())


def test_scores_match_hugging_face_on_the_same_weights(models):
    hf, ours = models
    tok = GPT2Tokenizer()
    right = right_norm = 0
    for item in ITEMS:
        tokens, mask = render(item, tok, block_size=64)
        with torch.no_grad():
            theirs = ending_losses(hf(tokens).logits, tokens, mask)
            mine = ending_losses(ours(tokens)[0], tokens, mask)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
        assert mine[0].argmin() == theirs[0].argmin() and mine[1].argmin() == theirs[1].argmin()
        right += int(theirs[0].argmin() == item["label"])
        right_norm += int(theirs[1].argmin() == item["label"])
    scores = hellaswag(ours, ITEMS, tok)
    assert scores == {"items": 3, "acc": right / 3, "acc_norm": right_norm / 3}
    assert hellaswag(ours, ITEMS, tok, limit=2)["items"] == 2


def test_a_char_model_is_scored_with_its_own_tokenizer(tiny_config):
    text = " ".join([ITEMS[1]["ctx"], *ITEMS[1]["endings"]])
    tok = CharTokenizer.from_text(text)
    import dataclasses

    model = GPT(dataclasses.replace(tiny_config, vocab_size=tok.vocab_size))
    scores = hellaswag(model, [ITEMS[1]], tok)
    assert scores["items"] == 1 and scores["acc"] in (0.0, 1.0)
    with pytest.raises(ValueError, match="no HellaSwag items"):
        hellaswag(model, [], tok)


def test_cli_scores_a_checkpoint(models, tmp_path, capsys, monkeypatch):
    from gpt2_book.__main__ import main

    hf, _ = models
    hf.save_pretrained(tmp_path / "model")
    path = _write(tmp_path / "hellaswag_val.jsonl", ITEMS)
    args = ["evaluate", "--checkpoint", str(tmp_path / "model"), "--device", "cpu"]
    assert main([*args, "--hellaswag", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 items: acc " in out and "acc_norm" in out
    assert main([*args, "--hellaswag", str(path), "--max-items", "1"]) == 0
    assert "1 items" in capsys.readouterr().out
    assert main([*args]) == 2
    assert "give --input and --context, or --hellaswag FILE" in capsys.readouterr().err
