"""The embedded engine's CPU kernels compute what transformers' own path computes."""

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from misstep.lm import EmbeddedEngine, build_tiny_model, local_lm
from misstep.lm.fused import FusedLlama, fusable
from misstep.lm.kernels import (
    GQA_SDPA,
    GrowingCache,
    Int4Linear,
    Int8Linear,
    OneDNNLinear,
    on_torch_thread,
    use_gqa_attention,
    use_onednn_linears,
)

PROMPTS = ["Say something.", "Count to 3.", "Name a colour."]


def _model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _padded_batch():
    """Two rows of different lengths, left-padded, as the engine lays them out."""
    ids = torch.tensor([[0, 0, 0, 11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28]])
    mask = (torch.arange(8) >= torch.tensor([[3], [0]])).long()
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def test_onednn_linears_replace_every_linear_layer_and_keep_the_logits(tiny_model_dir):
    plain, fast = _model(tiny_model_dir), _model(tiny_model_dir)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert use_onednn_linears(fast) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert sum(isinstance(m, OneDNNLinear) for m in fast.modules()) == linears
    ids, mask, positions = _padded_batch()
    expected = plain(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    got = fast(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the input embedding (tied to the output layer) is untouched: the packed weight is a copy
    assert type(fast.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(fast.get_input_embeddings().weight, plain.get_input_embeddings().weight)


@torch.inference_mode()
def test_grouped_query_attention_without_copies_gives_the_same_logits(tiny_model_dir):
    plain, fast = _model(tiny_model_dir), _model(tiny_model_dir)
    assert fast.config.num_key_value_heads < fast.config.num_attention_heads  # the tiny model shares heads too
    assert use_gqa_attention(fast) and fast.config._attn_implementation == GQA_SDPA
    ids, mask, positions = _padded_batch()
    caches = DynamicCache(), DynamicCache()
    outputs = [
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        for model, cache in zip((plain, fast), caches)
    ]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    # one decoding step on top of the masked cache
    step = torch.tensor([[16], [29]])
    mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
    outputs = [
        model(input_ids=step, attention_mask=mask, position_ids=positions[:, -1:] + 1, past_key_values=cache).logits
        for model, cache in zip((plain, fast), caches)
    ]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_growing_cache_matches_dynamic_cache_through_crop_select_and_repeat(tiny_model_dir):
    model = _model(tiny_model_dir)
    ids, mask, positions = _padded_batch()

    def run(cache):
        logits = [model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits]
        m, pos, pointers = mask, positions, []
        for token in range(5):  # decode a few steps, two tokens at a time as speculation does
            step = torch.tensor([[30 + token, 31 + token]] * 2)
            m = torch.cat([m, m.new_ones(2, 2)], dim=1)
            logits.append(
                model(
                    input_ids=step,
                    attention_mask=m,
                    position_ids=pos[:, -1:] + torch.tensor([1, 2]),
                    past_key_values=cache,
                ).logits
            )
            cache.crop(-1)  # the second token was a rejected draft
            m, pos = m[:, :-1], pos[:, -1:] + 1
            pointers.append(cache.layers[0].keys.data_ptr())
        cache.batch_select_indices(torch.tensor([1]))  # the first row finished
        m, pos = m[1:], pos[1:]
        head = copy.deepcopy(cache)
        head.batch_repeat_interleave(2)  # a cached prefix handed to a batch of two
        m2 = torch.cat([m.repeat(2, 1), m.new_ones(2, 1)], dim=1)
        logits.append(
            model(
                input_ids=torch.tensor([[40], [41]]),
                attention_mask=m2,
                position_ids=pos.repeat(2, 1) + 1,
                past_key_values=head,
            ).logits
        )
        return logits, pointers

    expected, _ = run(DynamicCache())
    got, pointers = run(GrowingCache())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(set(pointers)) == 1  # every step wrote into the same buffer: nothing was copied


@torch.inference_mode()
def test_the_fused_llama_forward_gives_the_models_logits_through_prefill_decoding_and_drafts(tiny_model_dir):
    """FusedLlama (one QKV product, one gate-and-up product, RMSNorm as one op) against the model it
    was built from: a padded prefill on a cached head, a decoding step, a two-token speculation pass,
    and a step that reads the rows' shared head once."""
    plain = _model(tiny_model_dir)
    fused = FusedLlama.of(_model(tiny_model_dir))
    # The separate projections were let go: the fused ones are the only copies.
    names = {n for n, _ in fused.named_parameters()}
    assert not any(p in n for n in names for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    head = torch.arange(100, 120)[None]
    caches = [GrowingCache(), GrowingCache()]
    for model, cache in zip((plain, fused), caches):
        model(input_ids=head, past_key_values=cache)
        cache.batch_repeat_interleave(2)
    ids, mask, positions = _padded_batch()
    mask = torch.cat([torch.ones(2, 20, dtype=mask.dtype), mask], dim=1)
    positions = positions + 20

    def both(**call):
        out = [model(**call, past_key_values=cache).logits for model, cache in zip((plain, fused), caches)]
        torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-4)

    both(input_ids=ids, attention_mask=mask, position_ids=positions)
    for width in (1, 2):  # a decoding step; the next token and one draft
        mask = torch.cat([mask, mask.new_ones(2, width)], dim=1)
        steps = positions[:, -1:] + torch.arange(1, width + 1)
        both(input_ids=torch.tensor([[16, 17][:width], [29, 30][:width]]), attention_mask=mask, position_ids=steps)
        positions = steps
    # Attention that reads the shared 20-token head once for both rows gives the same logits.
    mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
    step = dict(input_ids=torch.tensor([[18], [31]]), attention_mask=mask, position_ids=positions[:, -1:] + 1)
    per_row = fused(**step, past_key_values=copy.deepcopy(caches[1])).logits
    once = fused(**step, past_key_values=caches[1], shared_head=20).logits
    torch.testing.assert_close(once, per_row, rtol=1e-4, atol=1e-4)
    # Without a cached head (a padding query then has no key at all), and with logits_to_keep.
    ids, mask, positions = _padded_batch()
    last = fused(
        input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=GrowingCache(), logits_to_keep=1
    ).logits
    expected = plain(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1:]
    torch.testing.assert_close(last, expected, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_int8_linear_holds_a_quarter_of_the_bytes_and_approximates_the_layer():
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    linear.weight.copy_(torch.randn(96, 256, generator=generator) * 0.05)
    draft = Int8Linear(linear)
    assert draft.weight.dtype == torch.int8 and draft.weight.numel() == linear.weight.numel()
    x = torch.randn(2, 3, 256, generator=generator)
    got, expected = draft(x), linear(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    # int8 weights and bf16 inputs: about 1% of the output's scale, far from the layer's own numbers
    error = (got - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.03, error


@torch.inference_mode()
def test_int4_linear_holds_an_eighth_of_the_bytes_and_approximates_the_layer():
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    linear.weight.copy_(torch.randn(96, 256, generator=generator) * 0.05)
    draft = Int4Linear(linear)
    assert draft.packed.numel() * draft.packed.element_size() == linear.weight.numel() // 2
    x = torch.randn(2, 3, 256, generator=generator)
    got, expected = draft(x), linear(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    # 16 levels per group of 32 weights: several percent of the output's scale, more than int8's error
    error = (got - expected).abs().max() / expected.abs().max()
    int8_error = (Int8Linear(linear)(x) - expected).abs().max() / expected.abs().max()
    assert int8_error < error < 0.15, (error, int8_error)
    with pytest.raises(ValueError, match="groups of 32"):
        Int4Linear(torch.nn.Linear(48, 8))


@pytest.mark.parametrize("layer_product", [Int4Linear, Int8Linear])
@torch.inference_mode()
def test_a_low_bit_draft_approximates_the_model_and_shares_its_embeddings(tmp_path, layer_product):
    """The draft's layers split each RMSNorm around a low-bit product; its logits stay near the
    model's (a dropped norm weight or 1/||x|| would not), and it holds no second embedding."""
    model = _model(build_tiny_model(tmp_path / "model", initializer_range=0.1))
    generator = torch.Generator().manual_seed(0)
    for name, weight in model.named_parameters():
        if name.endswith("norm.weight"):  # norm weights of a trained model, not the initial ones
            weight.copy_(0.5 + torch.rand(weight.shape, generator=generator))
    fused = FusedLlama.of(model)
    draft = fused.draft(layer_product, head=Int8Linear)
    assert draft.embed_tokens is fused.embed_tokens and draft.norm is fused.norm
    assert type(draft.layers[0].gate_up) is layer_product and type(draft.lm_head) is Int8Linear
    ids, mask, positions = _padded_batch()
    expected = fused(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=GrowingCache()).logits
    got = draft(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=GrowingCache()).logits
    real = mask.bool()  # padding positions attend to nothing in particular
    error = (got - expected)[real].abs().max() / expected[real].abs().max()
    # The products' own error on this random model, with the norms left whole: 0.21 (4 bits), 0.023
    # (8). Without the norm weights' scaling the draft is off by 0.52.
    assert error < {Int4Linear: 0.3, Int8Linear: 0.05}[layer_product], error
    if layer_product is Int8Linear:  # 4 bits on a random model's flat logits: the pick is a coin toss
        assert (got[real].argmax(-1) == expected[real].argmax(-1)).float().mean() >= 0.9


def test_models_the_fused_forward_does_not_cover_keep_transformers_forward(tmp_path, tiny_model_dir):
    import json

    model_dir = build_tiny_model(tmp_path / "gelu")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    assert fusable(_model(tiny_model_dir)) and not fusable(_model(model_dir))
    engine = EmbeddedEngine(model_dir)
    try:
        assert not isinstance(engine.model, FusedLlama)
        assert any(isinstance(m, OneDNNLinear) for m in engine.model.modules())  # the other kernels still apply
        assert local_lm(engine=engine, max_tokens=5, cache=False)("Say something.")[0] is not None
    finally:
        engine.close()
    engine = EmbeddedEngine(tiny_model_dir)
    try:
        assert isinstance(engine.model, FusedLlama)
    finally:
        engine.close()


def test_the_engine_answers_the_same_with_and_without_its_cpu_kernels(tiny_model_dir):
    """Greedy answers, alone and batched, are transformers' own; the kernels only make them faster."""
    head = "Check each step of the solution. " * 30  # a shared prefix long enough to be cached
    prompts = [head + f"Question {n}: {n} + {n} = ?" for n in range(4)] + ["Say something.", "Count to 3."]
    answers = {}
    for kernels in (False, True):
        engine = EmbeddedEngine(tiny_model_dir, cpu_kernels=kernels)
        try:
            lm = local_lm(engine=engine, max_tokens=24, cache=False)
            with ThreadPoolExecutor(len(prompts)) as pool:
                answers[kernels] = ([lm(p)[0] for p in prompts], list(pool.map(lambda p: lm(p)[0], prompts)))
            assert engine.cpu_kernels == kernels
            assert any(isinstance(m, OneDNNLinear) for m in engine.model.modules()) == kernels
        finally:
            engine.close()
    assert answers[True] == answers[False]


def test_all_torch_work_of_the_engines_runs_on_one_thread(tiny_model_dir, tiny_engine):
    """A second thread's OpenMP pool slows every parallel region down (lm/kernels.py)."""
    torch_thread = on_torch_thread(threading.get_ident)
    assert torch_thread != threading.get_ident()
    assert on_torch_thread(on_torch_thread, threading.get_ident) == torch_thread  # nested: inline, no deadlock
    other = EmbeddedEngine(tiny_model_dir)
    seen = set()
    try:
        for engine in (tiny_engine, other):
            hook = engine.model.register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
            try:
                with ThreadPoolExecutor(3) as pool:
                    list(pool.map(lambda p: local_lm(engine=engine, max_tokens=4, cache=False)(p), PROMPTS))
            finally:
                hook.remove()
    finally:
        other.close()
    assert seen == {torch_thread}
