"""One stream, the embedded engine against llama.cpp, in alternating rounds.

run_all measures each engine in turn, minutes apart, and on a shared VM the speed of the
machine drifts more than that between its parts (llama.cpp f32 gave 72.9 and 93.5 tok/s in two
runs of one afternoon). Here every round runs both on the same story prompts (engines.py's, one
request at a time, temperature 0), one right after the other, and the ratio is taken per round.

    .venv/bin/python benchmarks/single_stream.py --llamacpp-python PY --gguf f32=smollm2-135m-f32.gguf
"""

from __future__ import annotations

import argparse
import statistics

from common import save
from engines import decode, parse_gguf, run_llamacpp, same_answers

import misstep

misstep.offline()  # before anything below imports DSPy (and LiteLLM)

from misstep.lm import EmbeddedEngine, local_lm, resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--llamacpp-python", required=True, help="a Python that has llama-cpp-python")
    parser.add_argument("--gguf", required=True, type=parse_gguf, help="NAME=PATH of the GGUF to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=3, help="story prompts a round (engines.py's runs 0..n-1)")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    name, gguf = args.gguf
    model_dir = resolve_model(args.model)
    engine = EmbeddedEngine(model_dir)
    lm = local_lm(engine=engine, cache=False, temperature=0.0)
    lm("warm up", max_tokens=8)
    rounds = []
    for number in range(args.rounds):
        # Per prompt: where both engines write the same greedy answer (counted), the ratio of rates is
        # the ratio of times.
        embedded, answers = zip(*(decode(lm, engine.tokenizer, 1, args.max_tokens, run) for run in range(args.prompts)))
        result, theirs = run_llamacpp(
            gguf, args.llamacpp_python, engine.tokenizer, args.prompts, args.max_tokens, story_only=True
        )
        llamacpp = result["concurrency_1"]["tokens_per_second"]["runs"]
        ratios = [a / b for a, b in zip(embedded, llamacpp)]
        same = same_answers({f"story c1 r{run}": ours for run, ours in enumerate(answers)}, theirs)["identical"]
        rounds.append(
            {"embedded": list(embedded), f"llamacpp-{name}": llamacpp, "ratios": ratios, "same_answers": same}
        )
        print(
            f"round {number + 1}: embedded {' '.join(f'{r:.1f}' for r in embedded)} tok/s, llama.cpp {name} "
            f"{' '.join(f'{r:.1f}' for r in llamacpp)}: {' '.join(f'{r:.2f}x' for r in ratios)}",
            flush=True,
        )
    engine.close()
    ratios = [r for round_ in rounds for r in round_["ratios"]]
    same = sum(round_["same_answers"] for round_ in rounds)
    print(
        f"embedded / llama.cpp {name}, one stream: median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {len(ratios)} prompts in {len(rounds)} rounds; "
        f"the same answer {same} of {len(ratios)} times"
    )
    save(
        "single_stream",
        model_dir.name,
        {
            "gguf": gguf.name,
            "max_tokens": args.max_tokens,
            "rounds": rounds,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "same_answers": same,
        },
        constrained=False,  # raw prompts, no adapter
    )


if __name__ == "__main__":
    main()
