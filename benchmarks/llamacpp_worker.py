"""Single-stream decoding with llama.cpp (llama-cpp-python), for the engine comparison.

Run by benchmarks/engines.py under a Python that has llama-cpp-python (it is not a misstep
dependency: a 6-17 minute source build here); needs nothing else:

    python benchmarks/llamacpp_worker.py JOB.json RESULT.json

JOB.json: {"gguf": path, "threads": n, "max_tokens": n, "requests": {key: [prompt text, ...]}}, the
prompts already chat-formatted by the caller so that every engine reads the same text. One
request at a time (llama.cpp's own server, too, serves concurrent requests one by one), greedy.
RESULT.json: {"load_seconds": s, "answers": {key: [text, ...]}, "seconds": {key: [s, ...]},
"first_token_seconds": [s, ...]}.
"""

import json
import sys
import time

from llama_cpp import Llama


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path).read())
    started = time.perf_counter()
    llm = Llama(model_path=job["gguf"], n_ctx=4096, n_threads=job["threads"], n_batch=512, verbose=False)
    result = {"load_seconds": time.perf_counter() - started, "answers": {}, "seconds": {}, "first_token_seconds": []}
    llm.create_completion("warm up", max_tokens=8, temperature=0.0)
    for key, prompts in job["requests"].items():
        answers, seconds = [], []
        for prompt in prompts:
            llm.reset()  # no reuse of the previous prompt's cache: every engine prefills every prompt
            started = time.perf_counter()
            out = llm.create_completion(prompt, max_tokens=job["max_tokens"], temperature=0.0, top_k=1)
            seconds.append(time.perf_counter() - started)
            answers.append(out["choices"][0]["text"])
        result["answers"][key], result["seconds"][key] = answers, seconds
    for prompt in job.get("first_token_prompts", []):
        llm.reset()
        started = time.perf_counter()
        llm.create_completion(prompt, max_tokens=1, temperature=0.0, top_k=1)
        result["first_token_seconds"].append(time.perf_counter() - started)
    with open(result_path, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
