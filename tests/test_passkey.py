"""Tests of gpt2_book.passkey (chapter notebooks/11_experiments.ipynb): planting passkeys in
training batches, and measuring their recall, against hand-checked rows and a stand-in model."""

import pytest
import torch
import torch.nn.functional as F

from gpt2_book.passkey import passkey_recall, passkey_windows, with_passkeys


def test_with_passkeys_plants_a_key_and_its_recalls():
    stream = torch.randint(0, 10, (4, 65))  # ids 0..9 only: keys 20, 21 and marker 30 are new
    plain = [(stream[:, :-1], stream[:, 1:])] * 3
    planted = list(with_passkeys(iter(plain), keys=[20, 21], marker=30, recalls=3, seed=1))
    assert len(planted) == 3
    for x, y in planted:
        assert torch.equal(x[:, 1:], y[:, :-1])  # still shifted by one
        rows = torch.cat([x, y[:, -1:]], dim=1)  # (B, T + 1)
        for row in rows:
            keys = ((row == 20) | (row == 21)).nonzero().flatten()
            marks = (row == 30).nonzero().flatten()
            assert len(marks) == 3 and torch.equal(row[marks + 1], row[keys[:1]].expand(3))
            assert keys[0] < 65 // 2 and (marks > keys[0]).all()  # the key first, then recalls
    again = list(with_passkeys(iter(plain), keys=[20, 21], marker=30, recalls=3, seed=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(planted, again, strict=True))
    assert torch.equal(plain[0][0], stream[:, :-1])  # the input batches are left as they were


def test_passkey_windows_put_the_key_far_back_and_the_marker_last():
    tokens = torch.randint(0, 10, (1000,))
    windows, answer = passkey_windows(tokens, context=100, n=5, keys=[20, 21], marker=30)
    assert windows.shape == (5, 100) and answer.shape == (5,)
    assert torch.equal(windows[:, 4], answer) and (windows[:, -1] == 30).all()
    assert torch.equal(windows[:, 5:-1], tokens[:500].view(5, 100)[:, 5:-1])  # text elsewhere


class _KeyFinder(torch.nn.Module):
    """A stand-in model that predicts the largest id it can see (the keys are the largest)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, last_only=False):
        logits = F.one_hot(idx[:, :-1].amax(dim=1), 31).float()[:, None] * 10  # (B, 1, V)
        return logits, None


def test_passkey_recall_finds_the_key_only_within_the_window():
    tokens = torch.randint(0, 10, (2000,))
    windows, answer = passkey_windows(tokens, context=64, n=8, keys=[20, 21, 22], marker=30)
    loss, accuracy = passkey_recall(_KeyFinder(), windows, answer)
    assert accuracy == 1.0 and loss < 0.01  # logit 10 against 30 zeros: about 30 e^-10
    _, cropped = passkey_recall(_KeyFinder(), windows, answer, window=32)  # key 59 back: hidden
    assert cropped == 0.0


def test_passkey_windows_refuse_too_little_text():
    with pytest.raises(ValueError, match="need context >= 6"):
        passkey_windows(torch.zeros(50, dtype=torch.long), context=64, n=2, keys=[1], marker=2)
    with pytest.raises(ValueError, match="need context >= 6"):
        passkey_windows(torch.zeros(50, dtype=torch.long), context=4, n=2, keys=[1], marker=2)
