"""gpt2_book.utils: choosing and checking devices (chapter 00)."""

import pytest
import torch

from gpt2_book.utils import default_device, resolve_device


def test_none_means_the_default_device():
    assert resolve_device(None) == default_device()


@pytest.mark.parametrize("name", ["cpu", torch.device("cpu"), "cpu:0"])
def test_cpu_is_always_there(name):
    assert resolve_device(name).type == "cpu"


@pytest.mark.parametrize(
    ("name", "message"),
    [("gpu", "is not a device"), ("", "is not a device"), ("cuda:x", "is not a device")]
    + [("meta", "holds no numbers"), (torch.device("meta"), "holds no numbers")],
)
def test_non_devices_are_refused_in_one_line(name, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve_device(name)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_missing_devices_are_refused(kind):
    backend = getattr(torch, kind)
    count = backend.device_count() if backend.is_available() else 0
    with pytest.raises(ValueError, match=f"this machine has no {kind}:{count} device"):
        resolve_device(f"{kind}:{count}")  # one past the last device
