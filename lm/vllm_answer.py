"""The answer constraint inside a vLLM server, so that both engines decode the same answer.

vLLM's structured outputs mask each token by the request's grammar, as the embedded engine does.
What they lack is the rest of `RowConstraint` (lm/constraint.py): markers written in the
tokenizer's own tokens, and free text closed before the token limit. This logits processor runs
that same `RowConstraint` per request, in the server's process: every server misstep starts loads
it (`--logits-processors`, VllmOptions.command), and a request names its constraint in
`vllm_xargs` (programs/answer_format.py). Importable only where vLLM is installed.
"""

from __future__ import annotations

import json

import torch
import xgrammar as xgr
from transformers import AutoTokenizer
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from misstep.lm.constraint import Grammars

XARG = "misstep_answer"  # the request's vllm_xargs key: the constraint's payload, as JSON


class AnswerProcessor(AdapterLogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        model = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer, local_files_only=True)
        self.grammars = Grammars(tokenizer, model.get_vocab_size())

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the greedy token

    def new_req_logits_processor(self, params):
        payload = (params.extra_args or {}).get(XARG)
        if payload is None:
            return None
        constraint = self.grammars.constraint(json.loads(payload))
        budget = params.max_tokens if params.max_tokens is not None else 1 << 30
        taken = 0

        def constrain(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            nonlocal taken
            for token in output_ids[taken:]:  # the tokens sampled since the last call
                constraint.accept(token)
            taken = len(output_ids)
            bitmask = self.grammars.bitmask(1)
            constraint.fill(bitmask, 0, output_ids, budget - len(output_ids))
            xgr.apply_token_bitmask_inplace(logits[None], bitmask)
            return logits

        return constrain
