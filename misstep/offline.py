"""Keep a run off the Internet, by asking rather than by import-time side effects.

LiteLLM (under DSPy) fetches a price map when first imported, `huggingface_hub` retries a
name it cannot find on disk, and `datasets` looks for Hub copies of local files; each reads
its switch once, when first imported. The command line calls `offline()` before importing
any of them; a script does the same, first thing:

    import misstep
    misstep.offline()
"""

from __future__ import annotations

import os

OFFLINE_ENVIRONMENT = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def offline() -> None:
    """Set the switches that keep LiteLLM, the Hub and `datasets` offline (values already set win)."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
