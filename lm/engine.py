"""The embedded engine: in-process generation with transformers behind a `dspy.LM`.

DSPy evaluates examples on threads and each thread calls `complete` on its own.
A worker thread gathers the requests that arrive together into one batch, and the
process's torch thread (lm/kernels.py) decodes them in a single loop with a shared KV
cache, dropping each row as it finishes; requests that arrive meanwhile join the batch
at its next pass. Every row keeps its own temperature, top-p/top-k, token limit, stop
strings and random generator, so a seeded request samples the same text whatever else
is in its batch; temperature 0 is greedy and deterministic.

Greedy rows are decoded speculatively by prompt lookup: the six stages copy a great deal
from their prompts (a chain rewritten with one step changed, the steps after an error), so
the tokens that followed the last few tokens' latest earlier occurrence are a cheap draft.
One forward pass checks up to `speculate` drafted tokens and keeps those the model would
have picked itself, so the answer is the greedy answer, in fewer passes: on this CPU a pass
costs about as much for 5 tokens as for 1 (it is bound by reading the weights).
"""

from __future__ import annotations

import atexit
import copy
import queue
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from dspy.clients.engines.base import validate_request
from dspy.lm15 import ContextLengthError, Message, Response, TextPart, Usage, response_to_events
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from .batch import Batch, stack_caches
from .constraint import Grammars, RowConstraint, mask
from .fused import FusedLlama, fusable
from .kernels import GrowingCache, Int4Linear, Int8Linear, on_torch_thread, use_gqa_attention, use_onednn_linears
from .sampling import pick
from .speculation import Backoff, copied_drafts, may_draft, model_drafts


@dataclass
class EngineSettings:
    """Every knob of the embedded engine, in one place."""

    max_batch_size: int = 8  # rows decoded together
    # How long the worker waits for more requests before it starts a batch.
    gather_window_s: float = 0.02
    default_max_tokens: int = 512  # for a request that sets none
    device: str | None = None  # None: CUDA where present, else CPU
    # Prompts of one stage share a long head (instructions and demos) and differ only in the
    # example: the KV caches of up to `prefix_cache_size` heads of at least `min_prefix_tokens`
    # tokens are kept and reused (prefill is most of the work).
    prefix_cache_size: int = 8
    min_prefix_tokens: int = 128
    # Prompt-lookup speculation: up to `speculate` drafted tokens a pass, while at most
    # `speculate_max_batch` rows decode, from n-grams of `lookup_ngram` (longest, shortest)
    # tokens; 0 turns it off. A pass whose drafts all fail makes the batch wait longer
    # before drafting again (1, 2, 4, ... passes): text with nothing to copy pays little.
    speculate: int = 4
    speculate_max_batch: int = 8
    lookup_ngram: tuple[int, int] = (3, 2)
    # On CPU: linear layers through oneDNN rather than MKL (about twice as fast here), attention
    # that reads shared key/value heads in place, and a KV cache that grows in place; see
    # lm/kernels.py. Off: transformers' own path, for comparison.
    cpu_kernels: bool = True
    # Prompts of one batch differ in length; padding them to the longest wastes that much
    # prefill. Past this ratio of padded to real tokens each row is prefilled on its own and
    # the caches are put together.
    padding_tolerance: float = 1.2
    # Where the text has nothing to copy, batches of up to `draft_max_batch` rows take their drafts
    # from a low-bit copy of the model instead (Llama models on CPU; 0: never): its layers' products
    # in `draft_bits` bits (4, or 8), its LM head in 8. Checking many rows' drafts costs more than
    # they save, hence the limit (benchmarks/engines.py measures it).
    draft_max_batch: int = 4
    draft_bits: int = 4

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {self.max_batch_size}")
        if self.draft_bits not in (4, 8):
            raise ValueError(f"draft_bits must be 4 or 8, not {self.draft_bits!r}")
        self.lookup_ngram = tuple(self.lookup_ngram)  # a list where it was read from a file


@dataclass
class _Job:
    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    stop: tuple[str, ...]
    seed: int | None
    answer: dict | None = None  # an answer constraint (programs/answer_format.py), or None
    future: Future = field(default_factory=Future)
    prompt_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    generator: torch.Generator | None = None
    constraint: RowConstraint | None = None


@dataclass
class EngineStats:
    """Counters for benchmarks: what the engine did and how long decoding took."""

    requests: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # prompt tokens served from the prefix cache instead of computed
    generated_tokens: int = 0
    busy_seconds: float = 0.0
    prefill_seconds: float = 0.0  # of busy_seconds, computing prompts (the rest decodes)
    constraint_seconds: float = 0.0  # of busy_seconds, answer constraints: masks, drafts' checks, matchers' steps
    forward_passes: int = 0  # decoding passes after the prompt's
    drafted_tokens: int = 0  # tokens proposed as drafts (copied from the prompt, or by the draft model)
    accepted_tokens: int = 0  # of those, the ones the model would have picked itself
    model_drafted_tokens: int = 0  # of the drafted, those the low-bit draft model proposed (the rest: prompt lookup)
    joined: int = 0  # requests that joined a batch already decoding
    constrained: int = 0  # requests decoded under an answer constraint
    longest_cache: int = 0  # the most positions a decoding batch's KV cache held (its memory is rows x this)


class EmbeddedEngine:
    """A DSPy engine (`complete(Request) -> Response`) running a local Hugging Face model."""

    def __init__(self, model_dir: Path | str, settings: EngineSettings | None = None, **overrides):
        """`settings` (default `EngineSettings()`), with any of its fields given as keywords on top."""
        self.model_dir = Path(model_dir)
        self.settings = replace(settings or EngineSettings(), **overrides)
        self._prefixes: OrderedDict[tuple[int, ...], DynamicCache] = OrderedDict()
        self.device = torch.device(self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.tokenizer.padding_side = "left"
        # fp32 on CPU: bf16 there was slower and gave degenerate text (ENVIRONMENT.md).
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.cpu_kernels = self.settings.cpu_kernels and self.device.type == "cpu"
        self.model, self.draft = on_torch_thread(self._load_model, dtype)
        self._new_cache = GrowingCache if self.cpu_kernels else DynamicCache
        self.max_context = getattr(self.model.config, "max_position_embeddings", 2048)
        self.eos_ids = self._eos_ids()
        self._grammars: Grammars | None = None  # made on the first constrained request
        self.stats = EngineStats()
        self._busy_since = time.perf_counter()  # where the running batch's uncounted time starts
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name=f"misstep-engine-{self.model_dir.name}", daemon=True)
        self._closed = False
        self._worker.start()
        # Stop the worker before the interpreter tears torch down under it.
        atexit.register(self.close)

    def _load_model(self, dtype: torch.dtype):
        """The model, and the low-bit draft model that shares its embeddings (or None)."""
        model = (
            AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, local_files_only=True)
            .to(self.device)
            .eval()
        )
        draft = None
        if self.cpu_kernels:
            if fusable(model):  # Llama: a forward of fewer, larger operations (lm/fused.py)
                model = FusedLlama.of(model)
                if self.settings.speculate and self.settings.draft_max_batch and Int8Linear.available():
                    # The layers' products in 4 bits where torch has that kernel (it streams weights faster
                    # than the 8-bit one), the LM head in 8. SmolLM2's draft picks the fp32 model's greedy
                    # token on 499 of 512 tokens so, 465 with a 4-bit head, 487 with every product in 8; a
                    # step takes 7.9 ms against 9.7 with every product in 8 (then 7.8 -> 7.1 ms once
                    # DraftLlamaLayer split the norms).
                    four_bits = self.settings.draft_bits == 4 and Int4Linear.available()
                    draft = model.draft(
                        lambda linear: (
                            Int4Linear(linear) if four_bits and Int4Linear.fits(linear) else Int8Linear(linear)
                        ),
                        head=Int8Linear,
                    )
                    if not self._runs(draft):  # a shape a low-bit kernel refuses: no draft, not a failed batch
                        draft = None
            else:
                use_gqa_attention(model)
            use_onednn_linears(model)
        return model, draft

    @staticmethod
    @torch.inference_mode()
    def _runs(model) -> bool:
        """Whether `model` gets through a forward pass (two tokens, a fresh cache)."""
        try:
            model(input_ids=torch.zeros((1, 2), dtype=torch.long), past_key_values=GrowingCache())
            return True
        except (RuntimeError, NotImplementedError):
            return False

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        eos = self.model.generation_config.eos_token_id
        ids |= set(eos) if isinstance(eos, list) else {eos}
        return {i for i in ids if i is not None}

    # ---- the DSPy engine contract -------------------------------------------------
    def complete(self, request) -> Response:
        validate_request(request)
        if self._closed:
            raise RuntimeError("the embedded engine is closed")
        config = request.config
        messages = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
            messages.append({"role": "system", "content": system})
        messages += [
            {"role": m.role if m.role != "developer" else "system", "content": m.text or ""} for m in request.messages
        ]
        job = _Job(
            messages=messages,
            max_new_tokens=config.max_tokens or self.settings.default_max_tokens,
            temperature=config.temperature or 0.0,
            top_p=config.top_p,
            top_k=config.top_k,
            stop=tuple(config.stop or ()),
            seed=config.seed,
            answer=answer_constraint(config.extensions),
        )
        self._queue.put(job)
        job.future.result()
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        for stop in job.stop:
            if stop in text:
                text = text[: text.index(stop)]
        return Response(
            id=None,
            model=self.model_dir.name,
            message=Message.assistant([TextPart(text)]),
            finish_reason=job.finish_reason,
            usage=Usage(input_tokens=len(job.prompt_ids), output_tokens=len(job.tokens)),
        )

    def stream(self, request):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Stop the worker and let go of the weights and cached prefixes: an engine is reachable
        from its thread and from atexit until then, so a closed engine's memory is freed even
        while an old LM still points at it."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join(timeout=30)
            if not self._worker.is_alive():
                self.model = self.draft = None
                self._prefixes.clear()

    def dump_state(self) -> dict:
        return {"model_dir": str(self.model_dir), **asdict(self.settings)}

    @classmethod
    def load_state(cls, state: dict) -> EmbeddedEngine:
        known = {f.name for f in fields(EngineSettings)}
        return cls(state["model_dir"], EngineSettings(**{k: v for k, v in state.items() if k in known}))

    # ---- the worker ------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.settings.gather_window_s
            while len(batch) < self.settings.max_batch_size:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(more)
            try:
                on_torch_thread(self._run_batch, batch)  # the process's one torch thread (lm/kernels.py)
            except Exception as exc:  # a failed batch fails its requests, never the worker
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _prepare(self, job: _Job) -> None:
        text = self.tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, tokenize=False)
        job.prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = self.max_context - len(job.prompt_ids)
        if room <= 0:
            raise ContextLengthError(
                f"prompt of {len(job.prompt_ids)} tokens does not fit the "
                f"{self.max_context}-token context of {self.model_dir.name}"
            )
        job.max_new_tokens = min(job.max_new_tokens, room)
        if job.answer is not None:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size)
            job.constraint = self._grammars.constraint(job.answer)
        if job.temperature > 0:
            job.generator = torch.Generator(device=self.device)
            job.generator.manual_seed(job.seed if job.seed is not None else random.randrange(2**63))

    @torch.inference_mode()
    def _run_batch(self, arrived: list[_Job]) -> None:
        self._busy_since = time.perf_counter()
        jobs = self._prepared(arrived)
        if not jobs:
            return
        self.stats.batches += 1
        try:
            self._decode(jobs)
        except Exception as exc:  # a failed batch fails its requests (joined ones too), never the worker
            for job in jobs:
                if not job.future.done():
                    self._finish(job, exc)
        self._count_busy()

    def _count_busy(self) -> None:
        """Add the batch's time since it was last counted to `busy_seconds`."""
        now = time.perf_counter()
        self.stats.busy_seconds += now - self._busy_since
        self._busy_since = now

    def _finish(self, job: _Job, failure: Exception | None = None) -> None:
        """Count the request and the time spent so far, then answer it: whoever waits for it sees
        it counted (the last answer of a batch comes before the batch ends)."""
        self._count_busy()
        self.stats.requests += 1
        self.stats.constrained += job.constraint is not None
        self.stats.prompt_tokens += len(job.prompt_ids)
        self.stats.generated_tokens += len(job.tokens)
        if failure is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(failure)

    def _decode(self, jobs: list[_Job]) -> None:
        """Decode `jobs` to their ends, one pass at a time; requests that arrive meanwhile join
        (and are appended to `jobs`)."""
        batch = self._prefill(jobs)
        # After passes that kept too few copied drafts (none, or fewer than half when the draft
        # model could draft instead), copy none for a while.
        backoff = Backoff()
        while batch.active:
            # Continuous batching: requests that arrived since the batch started join it at the next
            # pass instead of waiting for its longest answer (DSPy's threads ask at staggered times).
            joining = self._prepared(self._arrived(self.settings.max_batch_size - len(batch.active)))
            if joining:
                jobs += joining
                batch.join(self._prefill(joining), self._new_cache)
                self.stats.joined += len(joining)
            constrained = any(job.constraint is not None for job in batch.active)
            if constrained:
                with self._timed("constraint_seconds"):
                    self._constrain(batch)
            next_tokens = pick(batch.logits, batch.active)
            keep = self._take(batch.active, next_tokens.tolist())
            if not keep:
                break
            if len(keep) < len(batch.active):  # finished rows leave the batch and the KV cache
                (next_tokens,) = batch.keep(keep, next_tokens)
            drafts, copied, drafting = self._drafts(batch, next_tokens, backoff)
            if constrained:
                with self._timed("constraint_seconds"):
                    drafts = self._with_forced(batch, next_tokens, drafts)
            out = self._forward(batch, next_tokens, drafts)
            if drafts is None:
                batch.positions, batch.logits = batch.positions[:, -1:] + 1, out[:, -1, :]
            else:
                self._accept(batch, drafts, out, backoff if copied else None, drafting)

    def _drafts(self, batch: Batch, next_tokens: torch.Tensor, backoff: Backoff):
        """The pass's drafts ([rows, k], or None): copied from the prompt where they can be (free),
        else from the draft model; whether they were copied, and whether the draft model could draft."""
        settings = self.settings
        drafts = None
        if backoff.may_copy():
            drafts = copied_drafts(
                batch.active, settings.speculate, settings.speculate_max_batch, settings.lookup_ngram, self.device
            )
        copied, drafting = drafts is not None, may_draft(self.draft, batch.active, settings.draft_max_batch)
        if drafts is None and drafting:
            drafts = model_drafts(
                self.draft,
                batch.active,
                settings.speculate,
                next_tokens,
                batch.cache,
                batch.mask,
                batch.positions,
                **self._shared_head(batch.shared),
            )
            self.stats.model_drafted_tokens += drafts.numel()
        backoff.passed()
        return drafts, copied, drafting

    def _with_forced(self, batch: Batch, next_tokens: torch.Tensor, drafts: torch.Tensor | None) -> torch.Tensor | None:
        """The drafts, with each constrained row's forced tokens (a marker, a closing) in its own
        row: they are checked in the same pass, and kept. Only where every row is greedy (a draft
        is checked against the greedy pick) and speculation is on; where the pass has no drafts of
        its own, only in a batch narrow enough to check drafts for every row (`draft_max_batch`):
        in a wider one the other rows' wider pass costs more than the forced tokens save."""
        if not self.settings.speculate or any(job.temperature > 0 for job in batch.active):
            return drafts
        if drafts is None and len(batch.active) > self.settings.draft_max_batch:
            return drafts
        upcoming = [
            job.constraint.upcoming()[: job.max_new_tokens - len(job.tokens) - 1] if job.constraint else []
            for job in batch.active
        ]
        if not any(upcoming):
            return drafts
        if drafts is None:  # rows without forced tokens draft their next token again: a guess like any other
            drafts = next_tokens[:, None].repeat(1, min(self.settings.speculate, max(len(u) for u in upcoming)))
        for row, tokens in enumerate(upcoming):
            if tokens:
                width = min(len(tokens), drafts.shape[1])
                drafts[row, :width] = torch.tensor(tokens[:width], device=self.device)
        return drafts

    def _forward(self, batch: Batch, next_tokens: torch.Tensor, drafts: torch.Tensor | None) -> torch.Tensor:
        """One pass over each row's next token and its drafts; the logits after each of them."""
        width = 1 + (drafts.shape[1] if drafts is not None else 0)
        inputs = next_tokens[:, None] if drafts is None else torch.cat([next_tokens[:, None], drafts], dim=1)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.active), width))], dim=1)
        steps = torch.arange(1, width + 1, device=self.device)
        out = self.model(
            input_ids=inputs,
            attention_mask=batch.mask,
            position_ids=batch.positions[:, -1:] + steps,
            past_key_values=batch.cache,
            use_cache=True,
            **self._shared_head(batch.shared),
        ).logits
        self.stats.forward_passes += 1
        self.stats.longest_cache = max(self.stats.longest_cache, batch.mask.shape[1])
        return out

    def _accept(
        self, batch: Batch, drafts: torch.Tensor, out: torch.Tensor, backoff: Backoff | None, drafting: bool
    ) -> None:
        """Each row keeps the drafted tokens its model would have picked (greedy): its first `agrees`
        of them. The cache keeps as many as the row that kept most; in the other rows the surplus is
        masked out (a gap in the row, like padding). `backoff` (for copied drafts) learns whether the
        copy was worth its wider pass."""
        agrees = (out[:, :-1, :].argmax(dim=-1) == drafts).int().cumprod(dim=1).sum(dim=1)
        for row, job in enumerate(batch.active):  # a constrained row keeps what its masked greedy picks keep
            if job.constraint is not None:
                left = job.max_new_tokens - len(job.tokens)
                with self._timed("constraint_seconds"):
                    agrees[row] = job.constraint.drafts_kept(out[row, :-1], drafts[row].tolist(), job.tokens, left)
        most = int(agrees.max())
        if backoff is not None:  # worth it: one more token a row on average (half the drafts alone
            # when the draft model could draft instead)
            enough = len(batch.active) * (max(1, drafts.shape[1] // 2) if drafting else 1)
            backoff.judge(int(agrees.sum()), enough)
        self.stats.drafted_tokens += drafts.numel()
        self.stats.accepted_tokens += int(agrees.sum())
        rejected = drafts.shape[1] - most
        if rejected:
            batch.cache.crop(-rejected)
            batch.mask = batch.mask[:, :-rejected]
        if most:
            surplus = torch.arange(most, device=self.device) >= agrees[:, None]
            batch.mask[:, -most:].masked_fill_(surplus, 0)
        batch.logits = out[torch.arange(len(batch.active), device=self.device), agrees]
        batch.positions = batch.positions[:, -1:] + 1 + agrees[:, None]
        for column in range(most):  # the kept drafts, as if picked one by one
            keep = self._take(batch.active, drafts[:, column].tolist(), (agrees > column).tolist())
            if len(keep) < len(batch.active):
                drafts, agrees = batch.keep(keep, drafts, agrees)
            if not batch.active:
                break

    def _shared_prefix(self, jobs: list[_Job]) -> tuple[list[int], DynamicCache | None]:
        """The longest prompt head all rows share that is worth caching, and the cached KV of that
        head (one row; not to be changed). Without one: no prefix and None."""
        shortest = min(len(j.prompt_ids) for j in jobs)
        known = [
            p for p in self._prefixes if len(p) < shortest and all(tuple(j.prompt_ids[: len(p)]) == p for j in jobs)
        ]
        prefix = max(known, key=len, default=None)
        if prefix is None and len(jobs) > 1 and self.settings.prefix_cache_size:
            common = 0
            first = jobs[0].prompt_ids
            while common < shortest - 1 and all(j.prompt_ids[common] == first[common] for j in jobs):
                common += 1
            if common >= self.settings.min_prefix_tokens:
                prefix = tuple(first[:common])
                head = self._new_cache()
                self.model(
                    input_ids=torch.tensor([prefix], device=self.device),
                    past_key_values=head,
                    use_cache=True,
                    logits_to_keep=1,
                )
                self._prefixes[prefix] = head
                while len(self._prefixes) > self.settings.prefix_cache_size:
                    self._prefixes.popitem(last=False)
        if prefix is None:
            return [], None
        self._prefixes.move_to_end(prefix)
        return list(prefix), self._prefixes[prefix]

    def _prepared(self, batch: list[_Job]) -> list[_Job]:
        """The jobs ready to decode; a job whose prompt cannot be (too long, ...) fails alone."""
        jobs = []
        for job in batch:
            try:
                self._prepare(job)
                jobs.append(job)
            except Exception as exc:
                job.future.set_exception(exc)
        return jobs

    def _arrived(self, room: int) -> list[_Job]:
        """Up to `room` requests already waiting, without waiting for more."""
        arrived = []
        while len(arrived) < room:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # close(): leave the signal for the worker
                self._queue.put(None)
                break
            arrived.append(job)
        return arrived

    def _prefill(self, jobs: list[_Job]) -> Batch:
        """Compute the prompts of `jobs` into one KV cache: a batch of their rows, each with its last
        logits, its attention mask (0 for padding) and positions, and how many leading cache positions
        every row shares (the cached head they start from).

        Prompts that share a cached head start from it. Rows of similar length are prefilled at once,
        left-padded; past `padding_tolerance` each row is prefilled alone, so that no padding is
        computed, and the rows' caches are stacked. Either way a row is [head][padding][own tokens]."""
        with self._timed("prefill_seconds"):
            return self._prefill_rows(jobs)

    def _prefill_rows(self, jobs: list[_Job]) -> Batch:
        prefix, head = self._shared_prefix(jobs)
        start = len(prefix)
        shared = start if len(jobs) > 1 else 0
        self.stats.reused_prompt_tokens += start * len(jobs)
        suffixes = [j.prompt_ids[start:] for j in jobs]
        width = max(len(x) for x in suffixes)
        if width * len(suffixes) <= self.settings.padding_tolerance * sum(len(x) for x in suffixes):
            mask = torch.tensor(
                [[1] * start + [0] * (width - len(x)) + [1] * len(x) for x in suffixes], device=self.device
            )
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
            cache = self._cache_from(head)
            cache.batch_repeat_interleave(len(suffixes))
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in suffixes], device=self.device)
            logits = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **self._shared_head(shared),
            ).logits[:, -1, :]
            return Batch(list(jobs), logits, cache, mask, positions, shared)
        logits, rows = [], []
        for suffix in suffixes:
            cache = self._cache_from(head)
            positions = torch.arange(start, start + len(suffix), device=self.device)[None]
            out = self.model(
                input_ids=torch.tensor([suffix], device=self.device),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits.append(out.logits[:, -1, :])
            rows.append((cache, torch.ones((1, start + len(suffix)), dtype=torch.long, device=self.device)))
        cache, mask = stack_caches(rows, self._new_cache, head=start)
        positions = torch.tensor([[start + len(x) - 1] for x in suffixes], device=self.device)
        return Batch(list(jobs), torch.cat(logits), cache, mask, positions, shared)

    def _cache_from(self, head: DynamicCache | None) -> DynamicCache:
        """A cache of one row to prefill on: a copy of the cached head (which stays as it is), or empty."""
        return copy.deepcopy(head) if head is not None else self._new_cache()

    def _shared_head(self, shared: int) -> dict:
        """The model call's argument that lets attention read the rows' common head once (lm/kernels.py)."""
        return {"shared_head": shared} if shared and self.cpu_kernels else {}

    def _constrain(self, batch: Batch) -> None:
        """Mask the constrained rows' next-token logits to what their grammars allow."""
        rows = [
            (row, job.constraint, job.tokens, job.max_new_tokens - len(job.tokens))
            for row, job in enumerate(batch.active)
            if job.constraint is not None
        ]
        mask(batch.logits, self._grammars, rows)

    def _take(self, active: list[_Job], tokens: list[int], taking: list[bool] | None = None) -> list[int]:
        """Give each active row its next token (only the rows `taking` one, if given); finish the rows
        that end here. The rows that go on."""
        keep = []
        for row, (job, token) in enumerate(zip(active, tokens)):
            if taking is not None and not taking[row]:
                keep.append(row)
                continue
            if token in self.eos_ids:
                job.finish_reason = "stop"
            else:
                job.tokens.append(token)
                if job.constraint is not None:
                    with self._timed("constraint_seconds"):
                        job.constraint.accept(token)
                if job.stop and self._hit_stop(job):
                    job.finish_reason = "stop"
                elif len(job.tokens) < job.max_new_tokens:
                    keep.append(row)
                    continue
            self._finish(job)
        return keep

    @contextmanager
    def _timed(self, counter: str):
        """Add the block's wall time to `self.stats.<counter>`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.stats, counter, getattr(self.stats, counter) + time.perf_counter() - started)

    def _hit_stop(self, job: _Job) -> bool:
        tail = self.tokenizer.decode(job.tokens[-16:], skip_special_tokens=True)
        return any(stop in tail for stop in job.stop)


def answer_constraint(extensions: dict | None) -> dict | None:
    """The answer constraint a request carries in its metadata (`AnswerFormat.payload()`), or None."""
    metadata = (extensions or {}).get("metadata") or {}
    return metadata if "structured_outputs" in metadata else None
