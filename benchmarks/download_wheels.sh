#!/usr/bin/env bash
# The wheels a GPU machine without internet access needs to run the benchmarks, when its
# Python already has torch, transformers, accelerate, safetensors, huggingface_hub, numpy,
# pillow, psutil, sentencepiece and tokenizers (a typical CUDA image) but not the rest:
#
#   benchmarks/download_wheels.sh [DIR]       # default DIR: .whl (ignored by git), ~58 MB
#
# Then, on the GPU machine: WHEELS=DIR benchmarks/gpu_run.sh OUT. PYTHON_VERSION (3.12) is the
# GPU machine's Python. The pins are this project's (tests/test_benchmarks.py checks them
# against requirements*.txt and the development environment); --no-deps, so the list is
# complete by hand: cog needs coglet, structlog and requests, and pillow-heif a pillow of 11.1
# or later.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
version=${PYTHON_VERSION:-3.12}
PINNED=(
  diffusers==0.42.1 av==18.1.0 peft==0.21.2 torchao==0.18.0 pillow-heif==1.8.1
  cog==0.23.1 coglet==0.23.1 structlog==26.1.0
  requests==2.34.2 urllib3==2.8.0 charset_normalizer==3.5.3
)
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64; do
  platforms+=(--platform "$platform")
done
# Only these: a second version of a package left from an earlier download fails the install.
mkdir -p "$dir" && rm -f "$dir"/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
  --implementation cp "${platforms[@]}" --platform any -d "$dir" "${PINNED[@]}"
du -sh "$dir"
