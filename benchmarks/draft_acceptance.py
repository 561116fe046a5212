"""How much of the draft model's work the fp32 model keeps: no timing, so it runs beside anything.

Issue 19: a generated token costs about one draft step plus a share of a check pass, so what the
speculative decoder can gain turns on the draft's agreement with the model. Two figures:

- tokens a pass, by drafted tokens a pass (`--speculate`): greedy decoding of engines.py's story and
  recover prompts (one stream, 128 tokens), with the engine's counters (passes, drafted, kept, of
  which the draft model's);
- the draft's greedy pick against the fp32 model's on those same texts, teacher-forced, for the
  engine's draft and for cheaper drafts, if they still agree: drafts that skip some of its layers
  (`--skip`, comma-separated layer numbers), and drafts whose LM head scores only the first N token
  ids (`--head-rows N`; a BPE vocabulary numbers its tokens roughly from common to rare, and the
  head is a fifth of a draft step's bytes).

    .venv/bin/python benchmarks/draft_acceptance.py --speculate 4 6 8 --skip 20 --skip 24,26 --head-rows 8192
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
from common import save
from engines import requests

import misstep

misstep.offline()

from misstep.lm import EmbeddedEngine, local_lm, resolve_model
from misstep.lm.fused import FusedLlama
from misstep.lm.kernels import GrowingCache, Int8Linear, on_torch_thread

COUNTERS = ("generated_tokens", "forward_passes", "drafted_tokens", "accepted_tokens", "model_drafted_tokens")


def decoded(engine: EmbeddedEngine, prompts: int, max_tokens: int) -> tuple[dict, list[tuple[str, list, list]]]:
    """Per workload the engine's counters over its prompts, and every (workload, prompt ids, answer ids)."""
    lm = local_lm(engine=engine, cache=False, temperature=0.0)
    counts, texts = {}, []
    for workload in ("story", "recover"):
        before = asdict(engine.stats)
        for run in range(prompts):
            (messages,) = requests(workload, 1, run)
            answer = lm(messages=messages, max_tokens=max_tokens)[0]
            prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            texts.append((workload, ids, engine.tokenizer(answer, add_special_tokens=False)["input_ids"]))
        after = asdict(engine.stats)
        row = {name: after[name] - before[name] for name in COUNTERS}
        row["tokens_per_pass"] = row["generated_tokens"] / max(1, row["forward_passes"])
        counts[workload] = row
    return counts, texts


@torch.inference_mode()
def agreement(draft: FusedLlama, model, texts: list[tuple[str, list, list]]) -> dict[str, float]:
    """Per workload, the share of answer positions where `draft`'s greedy pick is `model`'s."""
    agreed: dict[str, list[int]] = {}
    for workload, prompt, answer in texts:
        ids = torch.tensor([prompt + answer])
        picks = [
            m(input_ids=ids, past_key_values=GrowingCache()).logits[0, len(prompt) - 1 : -1].argmax(-1)
            for m in (draft, model)
        ]
        tally = agreed.setdefault(workload, [0, 0])
        tally[0] += int((picks[0] == picks[1]).sum())
        tally[1] += len(answer)
    return {workload: same / n for workload, (same, n) in agreed.items()}


def rebuilt(draft: FusedLlama, layers=None, lm_head=None) -> FusedLlama:
    """`draft` with other `layers` or another `lm_head` (its own where None), the rest shared."""
    return FusedLlama(
        draft.config,
        draft.generation_config,
        draft.embed_tokens,
        draft.rotary_emb,
        draft.layers if layers is None else layers,
        draft.norm,
        draft.lm_head if lm_head is None else lm_head,
    )


def without_layers(draft: FusedLlama, skipped: set[int]) -> FusedLlama:
    """`draft` with the layers numbered in `skipped` left out (a fresh cache numbers the rest anew)."""
    return rebuilt(draft, layers=[layer for number, layer in enumerate(draft.layers) if number not in skipped])


def with_head_rows(draft: FusedLlama, rows: int) -> FusedLlama:
    """`draft` with an int8 LM head over the first `rows` token ids only (a model with tied embeddings:
    the head's weight is the embedding's)."""
    if not draft.config.tie_word_embeddings:
        raise SystemExit("--head-rows needs a model whose LM head is its input embedding")
    weight = draft.embed_tokens.weight.detach()[:rows]
    head = torch.nn.Linear(weight.shape[1], len(weight), bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return rebuilt(draft, lm_head=Int8Linear(head))


def measure(args) -> dict:
    model_dir = resolve_model(args.model)
    results: dict = {"prompts": args.prompts, "max_tokens": args.max_tokens, "by_speculate": {}}
    for k in args.speculate:
        engine = EmbeddedEngine(model_dir, speculate=k)
        try:
            results["by_speculate"][str(k)], texts = decoded(engine, args.prompts, args.max_tokens)
            print(f"speculate {k}: {results['by_speculate'][str(k)]}", flush=True)
            if engine.draft is None:
                continue
            if "agreement" not in results:
                drafts = {"engine's draft": engine.draft}
                drafts |= {f"skip {s}": without_layers(engine.draft, {int(n) for n in s.split(",")}) for s in args.skip}
                drafts |= {f"head rows {n}": with_head_rows(engine.draft, n) for n in args.head_rows}
                results["agreement"] = {
                    name: on_torch_thread(agreement, draft, engine.model, texts) for name, draft in drafts.items()
                }
                print(f"agreement: {results['agreement']}", flush=True)
        finally:
            engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--speculate", type=int, nargs="+", default=[4, 6, 8], help="drafted tokens a pass")
    parser.add_argument("--skip", action="append", default=[], help="layers a cheaper draft leaves out: 20 or 24,26")
    parser.add_argument("--head-rows", type=int, action="append", default=[], help="an LM head of the first N ids")
    parser.add_argument("--prompts", type=int, default=3, help="prompts of each workload")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--name", default="draft_acceptance", help="results file: benchmarks/results/NAME.json")
    args = parser.parse_args()
    save(args.name, args.model, measure(args))


if __name__ == "__main__":
    main()
