"""Tests for gpt2_book.generate (chapter notebooks/09_generation.ipynb).

References: generation without the cache (the whole sequence recomputed every step), a plain
loop written here from `GPT.forward` alone, one full forward pass, hand-made distributions for
the sampling filters, and Hugging Face's greedy generation on the same weights.
"""

import math
import re
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from gpt2_book.generate import (
    KVCache,
    decode_layout,
    generate,
    kv_cache_bytes,
    new_kv_caches,
    sample_next,
    stream,
    top_k_filter,
    top_p_filter,
)
from gpt2_book.gpt import GPT, GPTConfig

MODES = ["rope", "learned"]


def _model(config: GPTConfig, mode: str) -> GPT:
    return GPT(replace(config, pos_encoding=mode)).eval()


@torch.no_grad()
def _plain_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the obvious way: the whole context through the model at every step."""
    for _ in range(n):
        context = idx if model.rope is not None else idx[:, -model.config.block_size :]
        logits = model(context)[0][:, -1]  # (B, V)
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


# --- the cache changes nothing but the speed ----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_greedy_with_cache_equals_without_and_the_plain_loop(tiny_config, seed, mode):
    model = _model(tiny_config, mode)
    prompt = torch.randint(0, tiny_config.vocab_size, (3, 7))  # batch of 3
    n = 200  # past block_size = 64: learned mode slides its window, RoPE mode continues
    cached = generate(model, prompt, max_new_tokens=n, temperature=0)
    uncached = generate(model, prompt, max_new_tokens=n, temperature=0, use_cache=False)
    assert cached.shape == (3, 7 + n) and torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, _plain_greedy(model, prompt, n))


def test_learned_prompt_longer_than_block_size(tiny_config, seed):
    model = _model(tiny_config, "learned")
    prompt = torch.randint(0, tiny_config.vocab_size, (1, tiny_config.block_size + 10))
    out = generate(model, prompt, max_new_tokens=5, temperature=0)
    assert torch.equal(out, _plain_greedy(model, prompt, 5))


@pytest.mark.parametrize("mode", MODES)
def test_batch_rows_generate_as_if_alone(tiny_config, seed, mode):
    model = _model(tiny_config, mode)
    prompt = torch.randint(0, tiny_config.vocab_size, (3, 5))
    together = generate(model, prompt, max_new_tokens=30, temperature=0)
    alone = torch.cat(
        [generate(model, prompt[i : i + 1], max_new_tokens=30, temperature=0) for i in range(3)]
    )
    assert torch.equal(together, alone)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [1, 5])
def test_prefill_then_steps_equal_one_full_pass(tiny_config, seed, mode, chunk):
    model = _model(tiny_config, mode)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 40))
    caches = new_kv_caches(model, batch_size=2, max_len=40)
    with torch.no_grad():
        full = model(ids)[0]  # (B, T, V)
        parts = [model(ids[:, :25], kv_caches=caches)[0]]  # prefill
        for t in range(25, 40, chunk):  # then chunk tokens at a time, at their positions
            parts.append(model(ids[:, t : t + chunk], start_pos=t, kv_caches=caches)[0])
    assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_the_loop_checks_the_prompt_once_then_skips_the_models_check(tiny_config, seed):
    model = _model(tiny_config, "rope")
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    generate(model, torch.randint(0, 65, (2, 4)), max_new_tokens=6, temperature=0)
    assert len(calls) == 6 and all(kw.get("check_ids") is False for kw in calls)
    assert [kw["start_pos"] for kw in calls] == [0, 4, 5, 6, 7, 8]  # prefill, then one each
    with pytest.raises(ValueError, match="prompt ids"):  # the one check still catches bad ids
        generate(model, [[1, 65]], max_new_tokens=3)


# --- the KVCache type ----------------------------------------------------------------------------


def test_kv_cache_update_writes_and_returns_views():
    cache = KVCache(batch_size=2, n_head=3, max_len=10, head_dim=4)
    k, v = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    k_all, v_all = cache.update(k, v, 0)
    assert k_all.shape == (2, 3, 6, 4) and torch.equal(k_all, k) and torch.equal(v_all, v)
    k2, v2 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    k_all, v_all = cache.update(k2, v2, 6)
    assert k_all.shape == (2, 3, 7, 4)
    assert torch.equal(k_all[:, :, :6], k) and torch.equal(v_all[:, :, 6:], v2)
    assert k_all.data_ptr() == cache.k.data_ptr()  # a view of the buffer, not a copy


@pytest.mark.parametrize(
    "shape, start_pos",
    [
        ((1, 3, 6, 4), 5),
        ((1, 3, 2, 4), -1),
        ((2, 3, 1, 4), 0),
        ((1, 2, 1, 4), 0),
        ((1, 3, 1, 8), 0),
    ],
    ids=["too-long", "negative", "batch", "heads", "head-size"],
)
def test_kv_cache_that_cannot_hold_the_keys_is_a_clear_error(shape, start_pos):
    cache = KVCache(batch_size=1, n_head=3, max_len=10, head_dim=4)
    with pytest.raises(ValueError, match="KVCache of shape .* cannot hold positions"):
        cache.update(torch.zeros(shape), torch.zeros(shape), start_pos)


def test_cache_too_small_for_the_model_input_is_a_clear_error(tiny_config, seed):
    model = _model(tiny_config, "rope")
    caches = new_kv_caches(model, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="cannot hold positions 0..5"):
        model(torch.zeros(1, 6, dtype=torch.long), kv_caches=caches)


def test_kv_cache_shapes_and_memory(tiny_config):
    model = _model(tiny_config, "rope")
    caches = new_kv_caches(model, batch_size=2, max_len=10)
    assert len(caches) == tiny_config.n_layer and all(isinstance(c, KVCache) for c in caches)
    assert all(c.k.shape == c.v.shape == (2, 3, 10, 16) for c in caches)
    total = sum(c.k.numel() + c.v.numel() for c in caches) * 4
    assert kv_cache_bytes(tiny_config, batch_size=2, seq_len=10) == total
    # GPT-2 small, one sequence of 1024 tokens, float32: 72 MiB.
    assert kv_cache_bytes(GPTConfig(), batch_size=1, seq_len=1024) == 2 * 12 * 768 * 1024 * 4


def test_cache_follows_autocast_dtype(tiny_config, seed):
    model = _model(tiny_config, "rope")
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        caches = new_kv_caches(model, batch_size=2, max_len=8)
        assert all(c.k.dtype == c.v.dtype == torch.bfloat16 for c in caches)
        out = generate(model, prompt, max_new_tokens=10, temperature=0)  # no dtype mix-up
    assert out.shape == (2, 15)


def test_matches_hugging_face_greedy_generation(seed, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt2_book.pretrained import from_pretrained

    hf_config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=64, pad_token_id=0,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 100, (2, 6))
    ref = hf_model.generate(
        prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False,
        attention_mask=torch.ones_like(prompt),
    )  # fmt: skip
    assert torch.equal(generate(ours, prompt, max_new_tokens=40, temperature=0), ref)


@pytest.mark.parametrize("mode", MODES)
def test_decode_layout_changes_strides_not_results(tiny_config, seed, mode):
    model = _model(tiny_config, mode)
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    before = generate(model, prompt, max_new_tokens=30, temperature=0)
    logits = model(prompt)[0]
    params = [p.detach().clone() for p in model.parameters()]
    assert decode_layout(model) is model
    weight = model.transformer.h[0].mlp.c_fc.weight
    assert weight.shape == (4 * 48, 48) and weight.stride() == (1, 4 * 48)  # (in, out) in memory
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert_close(model(prompt)[0], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, prompt, max_new_tokens=30, temperature=0), before)
    assert decode_layout(model).transformer.h[0].mlp.c_fc.weight.stride() == (1, 4 * 48)


# --- sampling -----------------------------------------------------------------------------------


def test_fixed_generator_is_reproducible(tiny_config, seed):
    model = _model(tiny_config, "rope")
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 4))

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        knobs = {"temperature": 1.2, "top_k": 20, "top_p": 0.9, "generator": g}
        return generate(model, prompt, max_new_tokens=50, **knobs)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_sampling_with_cache_equals_without(tiny_config, seed):
    model = _model(tiny_config, "learned")
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 4))
    a, b = (
        generate(model, prompt, max_new_tokens=80, top_p=0.8,
                 generator=torch.Generator().manual_seed(1), use_cache=use_cache)
        for use_cache in (True, False)
    )  # fmt: skip
    assert torch.equal(a, b)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()

    def kept(p: float) -> set[int]:
        return set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())

    assert kept(0.3) == {1}  # the top token alone has 0.5 >= 0.3
    assert kept(0.6) == {1, 3}  # 0.5 < 0.6 <= 0.8
    assert kept(0.9) == {1, 3, 2}  # 0.8 < 0.9 <= 0.95
    assert kept(0.97) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    assert_close(top_p_filter(logits, 0.6)[0, [1, 3]], logits[0, [1, 3]])  # survivors unchanged


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, top_p=0.6, generator=g)
    assert set(ids.tolist()) == {1, 3}
    share = (ids == 1).float().mean().item()  # renormalised: 0.5 / 0.8
    assert abs(share - 0.625) < 0.05


def test_top_k():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, True, False]]
    assert torch.equal(top_k_filter(logits, 10), logits)  # k > V is fine


@pytest.mark.parametrize("mode", MODES)
def test_top_k_1_equals_greedy(tiny_config, seed, mode):
    model = _model(tiny_config, mode)
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 4))
    greedy = generate(model, prompt, max_new_tokens=40, temperature=0)
    top1 = generate(model, prompt, max_new_tokens=40, temperature=1.5, top_k=1)
    assert torch.equal(top1, greedy)


def test_low_temperature_approaches_greedy(seed):
    logits = torch.randn(500, 30)
    g = torch.Generator().manual_seed(0)
    agree = [
        (sample_next(logits, temperature=t, generator=g) == logits.argmax(-1)).float().mean().item()
        for t in (2.0, 1.0, 0.3, 0.03, 0.001)
    ]
    assert agree == sorted(agree) and agree[0] < 0.5 and agree[-1] > 0.99


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-39, 1e-45, 1e-50, 1e-300, 5e-324])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_temperatures_are_greedy_not_nan(seed, temperature, dtype):
    logits = (torch.randn(64, 50) * 30).to(dtype)  # gaps of many nats: z / tau overflows float32
    ids = sample_next(logits, temperature=temperature, top_p=0.9, generator=torch.Generator())
    best = logits.amax(-1, keepdim=True)  # (B, 1); bfloat16 rounding makes ties, any may win
    assert torch.equal(logits.gather(-1, ids[:, None]), best)


@pytest.mark.parametrize("temperature", [math.inf, math.nan, -0.5])
def test_unusable_temperatures_are_clear_errors(temperature):
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        sample_next(torch.zeros(1, 5), temperature=temperature)


def test_knobs_are_keyword_only(tiny_config):
    model = _model(tiny_config, "rope")
    with pytest.raises(TypeError):
        generate(model, [[1, 2]], 5)
    with pytest.raises(TypeError):
        sample_next(torch.zeros(1, 5), 0.5)


# --- stop token and streaming -------------------------------------------------------------------


def test_stop_token_stops_each_row_and_pads_it(tiny_config, seed):
    model = _model(tiny_config, "rope")
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 3))
    greedy = generate(model, prompt, max_new_tokens=30, temperature=0)
    stop = int(greedy[0, 3 + 5])  # the token row 0 produces at step 5
    out = generate(model, prompt, max_new_tokens=30, temperature=0, stop_token=stop)
    first = [(row[3:] == stop).nonzero()[0].item() if (row[3:] == stop).any() else None
             for row in greedy]  # fmt: skip
    for row, f in zip(range(2), first, strict=True):
        if f is None:
            assert torch.equal(out[row], greedy[row, : out.shape[1]])
        else:  # identical up to the stop token, then only stop tokens
            assert torch.equal(out[row, : 3 + f + 1], greedy[row, : 3 + f + 1])
            assert (out[row, 3 + f :] == stop).all()
    if all(f is not None for f in first):  # every row stopped: the loop ended early
        assert out.shape[1] == 3 + max(first) + 1
    assert out.is_contiguous()


def test_stream_yields_the_generated_columns(tiny_config, seed):
    model = _model(tiny_config, "learned")
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 3))
    columns = list(stream(model, prompt, max_new_tokens=12, temperature=0))
    assert len(columns) == 12 and all(c.shape == (2,) for c in columns)
    full = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert torch.equal(torch.stack(columns, 1), full[:, 3:])


def test_zero_new_tokens_returns_the_prompt(tiny_config, seed):
    model = _model(tiny_config, "rope")
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 3))
    assert torch.equal(generate(model, prompt, max_new_tokens=0), prompt)


def test_rope_table_grown_while_generating_still_trains(tiny_config, seed):
    model = _model(tiny_config, "rope")
    generate(model, torch.zeros(1, 1, dtype=torch.long), max_new_tokens=2 * tiny_config.block_size)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 3 * tiny_config.block_size))
    model(ids, ids)[1].backward()  # no "inference tensor" error from the grown cos/sin tables


# --- errors ------------------------------------------------------------------------------------


# Chapter 05's rule: a wrong type or value is a ValueError that names the argument, shows it
# and says what to pass. Issue 13 listed the cases that were TypeErrors from torch (top_k=2.5,
# max_new_tokens=2.5 / "5" / None, generator="seed") or were accepted silently (a float prompt,
# a bool for a count).
_PROMPT = re.escape("the prompt must be a (B, T) tensor of ids (torch.long or torch.int32)")


_BAD_REQUESTS = [
    ([[1, 2, 70]], {}, r"prompt ids must lie in \[0, 65\)"),
    ([[-1, 2]], {}, r"prompt ids must lie in \[0, 65\)"),
    (torch.zeros(1, 0, dtype=torch.long), {}, _PROMPT),
    ([[]], {}, _PROMPT),
    ([[1, 2], [3]], {}, r"all rows of one length T.*got \[\[1, 2\], \[3\]\]"),
    ([1, 2, 3], {}, _PROMPT + r".*got \[1, 2, 3\] \(list\)"),  # not a batch: [[1, 2, 3]]
    ("hello", {}, _PROMPT),
    (torch.tensor([[1.0, 2.0]]), {}, _PROMPT + r".*got a torch.float32 tensor"),
    ([[1.5, 2.0]], {}, _PROMPT),  # used to be cast to ids 1 and 2 without a word
    (torch.tensor([[True, False]]), {}, _PROMPT),
    (torch.tensor([[1, 2]], dtype=torch.uint8), {}, _PROMPT),
    ([[1, 2]], {"max_new_tokens": -1}, r"max_new_tokens must be an int >= 0, got -1 \(int\)"),
    ([[1, 2]], {"max_new_tokens": 2.5}, r"max_new_tokens must be an int >= 0, got 2.5"),
    ([[1, 2]], {"max_new_tokens": "5"}, r"max_new_tokens must be an int >= 0, got '5'"),
    ([[1, 2]], {"max_new_tokens": None}, r"max_new_tokens must be an int >= 0, got None"),
    ([[1, 2]], {"max_new_tokens": True}, r"max_new_tokens must be an int >= 0, got True"),
    ([[1, 2]], {"top_p": 0.0}, r"top_p must be a number in \(0, 1\] or None"),
    ([[1, 2]], {"top_p": 1.5}, r"top_p must be a number in \(0, 1\] or None"),
    ([[1, 2]], {"top_p": math.nan}, r"top_p must be a number in \(0, 1\] or None"),
    ([[1, 2]], {"top_p": "0.9"}, r"top_p must be a number in \(0, 1\] or None, got '0.9'"),
    ([[1, 2]], {"top_k": 0}, "top_k must be an int >= 1 or None"),
    ([[1, 2]], {"top_k": 2.5}, r"top_k must be an int >= 1 or None, got 2.5 \(float\)"),
    ([[1, 2]], {"top_k": True}, r"top_k must be an int >= 1 or None, got True \(bool\)"),
    ([[1, 2]], {"temperature": -0.5}, "temperature must be finite and >= 0"),
    ([[1, 2]], {"temperature": math.inf}, "temperature must be finite and >= 0"),
    ([[1, 2]], {"temperature": "1"}, "temperature must be finite and >= 0, got '1'"),
    ([[1, 2]], {"temperature": None}, "temperature must be finite and >= 0, got None"),
    ([[1, 2]], {"generator": "seed"}, "generator must be a torch.Generator or None"),
    ([[1, 2]], {"stop_token": 65}, r"stop_token must be an int in \[0, 65\), got 65"),
    ([[1, 2]], {"stop_token": 2.0}, r"stop_token must be an int in \[0, 65\), got 2.0"),
    ([[1, 2]], {"stop_token": True}, r"stop_token must be an int in \[0, 65\), got True"),
    ([[1, 2]], {"use_cache": "no"}, "use_cache must be True or False, got 'no'"),
]


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    _BAD_REQUESTS,
    ids=[
        f"{kwargs}" if kwargs else f"prompt={prompt!r:.30}" for prompt, kwargs, _ in _BAD_REQUESTS
    ],
)
def test_bad_requests_give_clear_errors(tiny_config, prompt, kwargs, message):
    model = _model(tiny_config, "rope")
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, **kwargs)
    with pytest.raises(ValueError, match=message):
        next(stream(model, prompt, **kwargs))


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"top_k": 2.5}, "top_k must be an int >= 1 or None"),
        ({"top_p": True}, r"top_p must be a number in \(0, 1\] or None, got True"),
        ({"temperature": True}, "temperature must be finite and >= 0, got True"),
        ({"generator": "seed"}, "generator must be a torch.Generator or None, got 'seed'"),
    ],
)
def test_sample_next_checks_its_knobs(knobs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.zeros(2, 5), **knobs)


def test_knobs_are_checked_once_per_request_not_per_token(tiny_config, seed, monkeypatch):
    import gpt2_book.generate as module

    calls, real = [], module._check_knobs
    monkeypatch.setattr(module, "_check_knobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    generate(_model(tiny_config, "rope"), [[1, 2]], max_new_tokens=10, top_k=5, top_p=0.9)
    assert calls == [1]
