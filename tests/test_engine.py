from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import dspy
import pytest

from misstep.lm import local_lm
from misstep.lm.engine import EmbeddedEngine, _Job

PROMPTS = [f"Count to {n}." for n in range(8)]


def test_generates_text_within_the_token_limit(tiny_lm, tiny_engine):
    before = tiny_engine.stats.generated_tokens
    [text] = tiny_lm("Say something.", max_tokens=5)
    assert isinstance(text, str) and text
    assert 0 < tiny_engine.stats.generated_tokens - before <= 5


def test_greedy_is_deterministic_and_batching_does_not_change_answers(tiny_lm, tiny_engine):
    single = [tiny_lm(p)[0] for p in PROMPTS]
    batches_before = tiny_engine.stats.batches
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: tiny_lm(p)[0], PROMPTS))
    assert together == single
    # concurrent requests were gathered: fewer generate loops than requests
    assert tiny_engine.stats.batches - batches_before < len(PROMPTS)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_engine):
    lm = local_lm(engine=tiny_engine, temperature=1.0, max_tokens=12, cache=False)
    alone = lm("Tell me a story.", seed=7)[0]
    with ThreadPoolExecutor(4) as pool:
        mixed = list(pool.map(lambda s: lm("Tell me a story.", seed=s)[0], [7, 8, 9, 7]))
    assert mixed[0] == mixed[3] == alone
    assert len(set(mixed[:3])) > 1  # other seeds sample other text


def test_stop_strings_cut_the_answer(tiny_lm):
    [text] = tiny_lm("Anything.", max_tokens=24)
    assert len(text) > 2
    stop = text[1:3]
    [cut] = tiny_lm("Anything.", max_tokens=24, stop=[stop])
    assert stop not in cut and text.startswith(cut)


def test_a_prompt_longer_than_the_context_is_an_error_not_a_hang(tiny_lm):
    with pytest.raises(Exception, match="does not fit"):
        tiny_lm("word " * 5000)


def test_cached_lm_answers_from_cache_without_the_engine(tiny_engine):
    lm = local_lm(engine=tiny_engine, max_tokens=8, cache=True)
    first = lm("Cache me.")[0]
    before = tiny_engine.stats.requests
    assert lm("Cache me.")[0] == first
    assert tiny_engine.stats.requests == before


def test_works_as_the_lm_of_a_dspy_program(tiny_lm):
    with dspy.context(lm=tiny_lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        with pytest.raises(Exception, match="failed to parse"):  # a random model cannot fill fields
            dspy.Predict("question -> answer")(question="2+2?")
    assert tiny_lm.history[-1]["response"] is not None


def test_a_reused_prompt_prefix_gives_the_same_answers(tiny_model_dir, tiny_engine):
    """Prompts that share a long head (instructions, demos) reuse its KV cache, unchanged answers."""
    from misstep.lm import EmbeddedEngine

    head = "You check arithmetic. " * 40  # well over min_prefix_tokens
    prompts = [head + f"Question {n}: what is {n} + {n}?" for n in range(6)]
    plain = EmbeddedEngine(tiny_model_dir, prefix_cache_size=0)
    try:
        expected = [local_lm(engine=plain, max_tokens=10, cache=False)(p)[0] for p in prompts]
    finally:
        plain.close()
    lm = local_lm(engine=tiny_engine, max_tokens=10, cache=False)
    reused_before = tiny_engine.stats.reused_prompt_tokens
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: lm(p)[0], prompts))
    again = lm(prompts[2])[0]  # alone, served from the cached head
    assert together == expected and again == expected[2]
    assert tiny_engine.stats.reused_prompt_tokens - reused_before > 6 * 128


def test_prompt_lookup_speculation_gives_the_greedy_answer_in_fewer_passes(tiny_model_dir):
    """Drafts copied from the prompt are kept only where the model would have picked them itself."""
    from misstep.lm import EmbeddedEngine

    # Prompts that invite copying (a chain to rewrite), and plain ones.
    chain = "Step 1: 4 x 2 = 8\nStep 2: 8 + 5 = 13\nStep 3: 13 - 3 = 10\n"
    prompts = [f"Copy this solution exactly:\n{chain * 2}", "Repeat: a b c a b c a b c", *PROMPTS[:4]]
    answers, stats = {}, {}
    for speculate in (0, 4):
        engine = EmbeddedEngine(tiny_model_dir, speculate=speculate, draft_max_batch=0)  # copied drafts only
        answers[speculate], stats[speculate] = _alone_and_paired(engine, prompts, max_tokens=48)
    assert answers[4] == answers[0]
    assert answers[0][0] == answers[0][1]
    assert stats[0].drafted_tokens == 0
    assert stats[4].accepted_tokens > 0  # some drafts were right ...
    assert stats[4].forward_passes < stats[0].forward_passes  # ... so fewer passes made the same tokens
    assert stats[4].generated_tokens == stats[0].generated_tokens


def _alone_and_paired(engine, prompts: list[str], max_tokens: int) -> tuple[tuple[list[str], list[str]], object]:
    """Greedy answers to `prompts` one at a time, then two at a time (speculation still on, each row
    keeping its own number of drafts), and the engine's stats; the engine is closed after."""
    try:
        lm = local_lm(engine=engine, max_tokens=max_tokens, cache=False)
        single = [lm(p)[0] for p in prompts]
        with ThreadPoolExecutor(2) as pool:
            paired = list(pool.map(lambda p: lm(p)[0], prompts))
        return (single, paired), engine.stats
    finally:
        engine.close()


@pytest.mark.parametrize("draft_bits", [4, 8])
def test_drafts_of_a_low_bit_copy_give_the_greedy_answer_in_fewer_passes(tmp_path, draft_bits):
    """Where there is nothing to copy, a low-bit copy of the model drafts; the fp32 model keeps only
    the drafted tokens it would have picked itself, alone and in a batch of two."""
    from misstep.lm import EmbeddedEngine, build_tiny_model
    from misstep.lm.fused import FusedLlama
    from misstep.lm.kernels import Int4Linear, Int8Linear

    model_dir = build_tiny_model(tmp_path / "model", initializer_range=0.3)  # greedy text that varies
    answers, stats = {}, {}
    for draft_max_batch in (0, 2):
        engine = EmbeddedEngine(model_dir, draft_max_batch=draft_max_batch, draft_bits=draft_bits)
        assert (engine.draft is not None) == bool(draft_max_batch)
        if engine.draft is not None:  # it shares the model's embeddings: no second copy of them
            assert isinstance(engine.draft, FusedLlama)
            assert engine.draft.embed_tokens is engine.model.embed_tokens
            layer_product = Int4Linear if draft_bits == 4 and Int4Linear.available() else Int8Linear
            assert type(engine.draft.layers[0].gate_up) is layer_product
            assert type(engine.draft.lm_head) is Int8Linear
        answers[draft_max_batch], stats[draft_max_batch] = _alone_and_paired(engine, PROMPTS, max_tokens=40)
    assert answers[2] == answers[0]
    assert answers[0][0] == answers[0][1]
    assert len(set(answers[0][0])) == len(PROMPTS)  # every prompt its own text: a wrong draft would show
    assert stats[0].model_drafted_tokens == 0
    assert stats[2].model_drafted_tokens > 0 and stats[2].accepted_tokens > 0
    assert stats[2].forward_passes < stats[0].forward_passes
    assert stats[2].generated_tokens == stats[0].generated_tokens


def test_a_draft_model_the_low_bit_kernels_refuse_is_left_out(tiny_model_dir, monkeypatch):
    from misstep.lm import EmbeddedEngine
    from misstep.lm.kernels import Int4Linear, Int8Linear

    def refuse(self, flat):  # the injected fault: the kernels reject the layer's shape
        raise RuntimeError("low-bit kernel: unsupported shape")

    monkeypatch.setattr(Int4Linear, "product", refuse)
    monkeypatch.setattr(Int8Linear, "product", refuse)
    engine = EmbeddedEngine(tiny_model_dir)
    try:
        assert engine.draft is None
        assert local_lm(engine=engine, max_tokens=8, cache=False)("Count to 3.")[0] is not None
    finally:
        engine.close()


def test_prefilling_row_by_row_gives_what_padding_gives(tiny_model_dir):
    """Past `padding_tolerance` each row's prompt is prefilled alone and the caches are stacked: the
    same logits, and the same next step from the cache, as padding all rows to the longest; and
    attention that reads the rows' common head once gives the same next step as reading it per row."""
    import copy

    import torch

    from misstep.lm import EmbeddedEngine
    from misstep.lm.engine import _Job

    engine = EmbeddedEngine(tiny_model_dir)
    endings = [[5, 6, 7], list(range(200, 230)), [8]]
    try:
        with torch.inference_mode():
            for head in (
                [],
                list(range(100, 100 + engine.settings.min_prefix_tokens + 5)),
            ):  # without, with a shared head
                results = []
                for tolerance in (1e9, 1.0):  # padded; row by row
                    engine.settings.padding_tolerance = tolerance
                    jobs = [
                        _Job(
                            messages=[],
                            max_new_tokens=1,
                            temperature=0.0,
                            top_p=None,
                            top_k=None,
                            stop=(),
                            seed=None,
                            prompt_ids=head + ending,
                        )
                        for ending in endings
                    ]
                    batch = engine._prefill(jobs)
                    logits, cache, mask, positions, shared = (
                        batch.logits,
                        batch.cache,
                        batch.mask,
                        batch.positions,
                        batch.shared,
                    )
                    assert shared == len(head)  # the head stays in front, the same in every row
                    steps = []
                    for reads_head_once in (False, True):
                        step = dict(
                            input_ids=torch.tensor([[1], [2], [3]]),
                            position_ids=positions[:, -1:] + 1,
                            attention_mask=torch.cat([mask, mask.new_ones(3, 1)], dim=1),
                            past_key_values=copy.deepcopy(cache),
                        )
                        steps.append(engine.model(**step, **engine._shared_head(shared if reads_head_once else 0)))
                    torch.testing.assert_close(steps[1].logits, steps[0].logits, rtol=1e-4, atol=1e-4)
                    results.append((logits, steps[0].logits))
                torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-4)
            assert engine.stats.reused_prompt_tokens > 0  # the second round started from the cached head
    finally:
        engine.close()


def test_requests_that_arrive_during_a_batch_join_it_and_answer_as_alone(tiny_model_dir):
    """Continuous batching: two requests sent while a batch decodes join it at its next pass."""
    import time

    from misstep.lm import EmbeddedEngine

    engine = EmbeddedEngine(tiny_model_dir)
    lm = local_lm(engine=engine, temperature=1.0, max_tokens=30, cache=False)
    late = ThreadPoolExecutor(2)
    futures = []

    def send_late_requests(module, args, kwargs):  # on the first decoding pass of the first request
        if kwargs["input_ids"].shape[1] == 1 and not futures:
            futures.extend(late.submit(lm, p, seed=s) for p, s in (("Late one.", 3), ("Late two.", 4)))
            deadline = time.monotonic() + 30
            while engine._queue.qsize() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)

    try:
        hook = engine.model.register_forward_pre_hook(send_late_requests, with_kwargs=True)
        first = lm("First, a long answer.", seed=2)[0]
        joined = [f.result()[0] for f in futures]
        hook.remove()
        assert engine.stats.joined == 2 and engine.stats.batches == 1  # one batch served all three
        alone = [lm(p, seed=s)[0] for p, s in (("First, a long answer.", 2), ("Late one.", 3), ("Late two.", 4))]
        assert [first, *joined] == alone
        assert engine.stats.batches == 4
    finally:
        late.shutdown()
        engine.close()


def test_a_batch_that_lives_on_keeps_only_the_cache_its_rows_attend_to(tiny_model_dir):
    """Under DSPy's threads a batch lives as long as requests keep arriving: each thread asks again as
    soon as it is answered, so rows keep joining one batch. Its KV cache holds the columns of the rows
    decoding now (their prompts, their answers and drafts), not every token the batch ever decoded."""
    from misstep.lm import EmbeddedEngine

    engine = EmbeddedEngine(tiny_model_dir)
    threads, rounds = 3, 20
    lengths = [5, 7, 11]  # answers of different lengths: rows finish, and their threads' next ones join, apart

    def ask_again_and_again(thread: int) -> list[str]:
        lm = local_lm(engine=engine, temperature=1.0, max_tokens=lengths[thread], cache=False)
        return [lm(f"Thread {thread}, question {n}.", seed=n)[0] for n in range(rounds)]

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(ask_again_and_again, range(threads)))
        stats = engine.stats
        assert stats.requests == threads * rounds
        assert stats.joined > threads * rounds // 2  # most requests joined a batch already decoding
        longest_prompt = max(
            len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            for text in (
                engine.tokenizer.apply_chat_template(
                    [{"role": "user", "content": f"Thread {t}, question {n}."}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for t in range(threads)
                for n in range(rounds)
            )
        )
        # One row's span: its prompt and one column per pass of its answer (sampled rows take no drafts).
        assert stats.longest_cache <= longest_prompt + max(lengths) + 1
    finally:
        engine.close()


def test_a_request_is_answered_with_its_time_already_counted(tiny_model_dir):
    # What a benchmark reads when its last answer arrives: the engine's time includes that answer's
    # batch, though the batch's bookkeeping ends after it (at 8 concurrent requests one batch is
    # the whole run, and its time was once read as zero).
    engine = EmbeddedEngine(tiny_model_dir, max_batch_size=8)
    try:
        job = _Job(
            messages=[{"role": "user", "content": "Count to three."}],
            max_new_tokens=6,
            temperature=0.0,
            top_p=None,
            top_k=None,
            stop=(),
            seed=0,
        )
        seen = []
        job.future.add_done_callback(lambda _: seen.append(asdict(engine.stats)))  # at the moment it is answered
        engine._queue.put(job)
        job.future.result()
    finally:
        engine.close()
    at_answer = seen[0]
    assert at_answer["requests"] == 1 and at_answer["generated_tokens"] == len(job.tokens)
    assert at_answer["busy_seconds"] >= at_answer["prefill_seconds"] > 0
