#!/usr/bin/env bash
# Install llama-cpp-python for `tunelab bench --compare llama.cpp`.
#   VENV (default $HOME/.cache/tunelab-bench/venv); the bench finds it there,
#   or through TUNELAB_LLAMA_CPP_PYTHON=/path/to/python.
# The default llama-cpp-python build uses -march=native, which on AMX CPUs
# compiles ggml's AMX path; its first llama_decode segfaults in
# ggml_backend_amx_mul_mat (llama.cpp issue #20824). So build with
# GGML_NATIVE=OFF, every AVX-512/VNNI/BF16 feature on and AMX off.
# About 5 minutes with 2 build jobs.
set -euo pipefail
VENV="${VENV:-$HOME/.cache/tunelab-bench/venv}"
LOGS="${LOGS:-$HOME/.cache/tunelab-bench/logs}"
mkdir -p "$LOGS"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
 -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
 -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
"$VENV/bin/pip" install -v --no-cache-dir llama-cpp-python==0.3.36 > "$LOGS/llama-build.log" 2>&1
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
