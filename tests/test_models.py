from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from misstep.lm import ModelNotFoundError, build_tiny_model, fingerprint, lm_name, resolve_model


def test_tiny_model_is_a_hugging_face_folder_with_the_smollm2_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    assert resolve_model(tiny_model_dir) == tiny_model_dir.resolve()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_unknown_models_are_refused_clearly(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)


def test_new_weights_get_a_new_name(tmp_path, tiny_model_dir):
    """DSPy caches answers by model name alone; changed weights must change the name."""
    copy = build_tiny_model(tmp_path / tiny_model_dir.name, seed=0)  # same folder name, same weights
    assert lm_name(copy) == lm_name(tiny_model_dir)
    (Path(copy) / "train_summary.json").write_text('{"wall_seconds": 12.5}')  # how long it took: not the weights
    assert lm_name(copy) == lm_name(tiny_model_dir)
    weights_file = Path(copy) / "model.safetensors"
    weights = load_file(weights_file)
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, weights_file, metadata={"format": "pt"})
    assert fingerprint(copy) != fingerprint(tiny_model_dir)
    assert lm_name(copy) != lm_name(tiny_model_dir)
