"""gpt2_book.loss: the cross-entropy of the read-out without all the logits (chapter 05)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.loss import linear_cross_entropy


def _inputs(N=50, C=8, V=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, C, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    return h, weight, targets


def _reference(h, weight, targets):
    """Autograd through the plain formula: all N x V logits, then F.cross_entropy."""
    h, weight = h.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = F.cross_entropy(h @ weight.T, targets, ignore_index=-1)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [1, 7, 50, 64, None])
@pytest.mark.parametrize("left_out", [0, 3])
def test_loss_and_gradients_match_f_cross_entropy(chunk_rows, left_out):
    h, weight, targets = _inputs()
    if left_out:
        targets[::left_out] = -1  # ignore_index positions
    loss = linear_cross_entropy(h, weight, targets, chunk_rows=chunk_rows)
    (2.5 * loss).backward()  # an incoming gradient other than 1, as with grad accumulation
    ref_loss, ref_h, ref_w = _reference(h, weight, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, 2.5 * ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, 2.5 * ref_w, rtol=1e-5, atol=1e-7)


def test_the_loss_of_a_uniform_model_is_ln_v():
    V = 1000
    h = torch.zeros(20, 4, requires_grad=True)  # every score 0: a uniform softmax
    loss = linear_cross_entropy(h, torch.randn(V, 4), torch.randint(0, V, (20,)))
    assert loss.item() == pytest.approx(math.log(V), abs=1e-5)


def test_every_target_left_out_gives_nan_as_f_cross_entropy_does():
    h, weight, targets = _inputs()
    targets[:] = -1
    assert torch.isnan(linear_cross_entropy(h, weight, targets))
    assert torch.isnan(F.cross_entropy(h @ weight.T, targets, ignore_index=-1))


def test_only_the_inputs_that_need_a_gradient_get_one():
    h, weight, targets = _inputs()
    linear_cross_entropy(h, weight.detach(), targets).backward()
    _, ref_h, _ = _reference(h, weight, targets)
    torch.testing.assert_close(h.grad, ref_h, rtol=1e-5, atol=1e-7)
    h2 = h.detach()
    linear_cross_entropy(h2, weight, targets).backward()
    _, _, ref_w = _reference(h2, weight, targets)
    torch.testing.assert_close(weight.grad, ref_w, rtol=1e-5, atol=1e-7)


def test_without_gradients_it_is_the_loss_alone():
    h, weight, targets = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(h, weight, targets)[0], rtol=1e-6, atol=1e-6)


def test_bfloat16_inputs_score_in_float32():
    h, weight, targets = _inputs(dtype=torch.bfloat16)
    loss = linear_cross_entropy(h, weight, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    # the reference multiplies in bfloat16 too, then takes the float32 cross-entropy
    ref = F.cross_entropy((h.detach() @ weight.detach().T).float(), targets)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_gpt_forward_gives_the_same_loss_and_gradients_without_logits(pos_encoding):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", pos_encoding=pos_encoding))
    x = torch.randint(0, model.config.vocab_size, (3, 16))
    y = torch.roll(x, -1, dims=1)
    y[0, :5] = -1
    logits, loss = model(x, y)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    none, fused = model(x, y, return_logits=False)
    fused.backward()
    assert none is None
    torch.testing.assert_close(fused, loss, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], rtol=1e-4, atol=1e-6, msg=name)
    # without targets there is no loss to fuse with: the logits come back as always
    assert model(x, return_logits=False)[0].shape == logits.shape


def test_gpt_forward_under_cpu_autocast():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"))
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = model(x, x)
        _, fused = model(x, x, return_logits=False)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain.float(), rtol=2e-2, atol=2e-2)
    fused.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_a_bfloat16_weights_gradient_is_summed_in_float32():
    # 512 chunks of one row: summed in bfloat16, the rounding of every addition would pile up
    h, weight, targets = _inputs(N=512, C=8, V=37, dtype=torch.bfloat16)
    linear_cross_entropy(h, weight, targets, chunk_rows=1).backward()
    _, _, ref_w = _reference(h, weight, targets)  # float32 throughout
    assert weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(weight.grad.float(), ref_w, rtol=2e-2, atol=2e-4)
