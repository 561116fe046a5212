#!/usr/bin/env bash
# Issue 19's engine figures on both instruction-set paths of one machine, one after the other on an
# idle machine (~40 minutes): natively, then held to AVX2 code (torch's ATen kernels by
# ATEN_CPU_CAPABILITY, oneDNN's by ONEDNN_MAX_CPU_ISA, MKL's by MKL_ENABLE_INSTRUCTIONS; which kernels
# honour them: benchmarks/isa_check.py) against a llama.cpp built for the same path. Each result file
# records the CPU's flags, the path it ran on and the bandwidth and matmul probes; the AVX2 path's
# files end in -avx2.json. vLLM's own C++ kernels are built for the CPU they were compiled on and do
# not read these switches: on an AVX-512 machine its "AVX2" figures still run its AVX-512 kernels.
#
#   LLAMA_NATIVE=... LLAMA_AVX2=... GGUF_F32=... VLLM_PYTHON=... bash benchmarks/both_paths.sh [native] [avx2]
#
# llama-cpp-python without AVX-512 (README, "Benchmarks"):
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" pip install llama-cpp-python
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_NATIVE=${LLAMA_NATIVE:-/tmp/llama/native/bin/python}
LLAMA_AVX2=${LLAMA_AVX2:-/tmp/llama/avx2/bin/python}
GGUF_F32=${GGUF_F32:-/tmp/llama/gguf/smollm2-135m-f32.gguf}
VLLM_PYTHON=${VLLM_PYTHON:-/tmp/vvenv/bin/python}
PY=.venv/bin/python
source benchmarks/paths.sh
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(native avx2)

for path in "${paths[@]}"; do
  hold "$path"
  llama=$LLAMA_NATIVE
  if [ "$path" = avx2 ]; then llama=$LLAMA_AVX2; fi
  echo "== $(date -u +%FT%TZ) $path: one stream against llama.cpp f32, alternating rounds"
  env "${held[@]}" $PY benchmarks/single_stream.py --llamacpp-python "$llama" --gguf f32="$GGUF_F32" --rounds 3
  echo "== $(date -u +%FT%TZ) $path: engines at 1, 4 and 8 concurrent"
  env "${held[@]}" $PY benchmarks/engines.py --engines embedded-plain,embedded,vllm,llamacpp-f32 --repeats 1 \
    --vllm-python "$VLLM_PYTHON" --llamacpp-python "$llama" --gguf f32="$GGUF_F32"
  echo "== $(date -u +%FT%TZ) $path: a decoding step's parts"
  env "${held[@]}" $PY benchmarks/decode_parts.py --repeats 30
  echo "== $(date -u +%FT%TZ) $path: fine-tuning against the matmul probe"
  env "${held[@]}" $PY benchmarks/training.py --steps 4 --repeats 2
done
echo "== $(date -u +%FT%TZ) done"
