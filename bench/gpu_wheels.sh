#!/usr/bin/env bash
# Download the wheels the GPU benchmark needs beyond what the GPU machine's image holds (it has no network):
# torchao for train.fp8, torchtitan 0.2.2 with the dependencies that image lacks, and TRL (bench/dpo.py's peer).
#
#   bash bench/gpu_wheels.sh [DIR]        # default DIR: .whl (add it to .git/info/exclude to carry it)
#
# The image is Python 3.12 with torch 2.11, triton, pandas, pyarrow, einops, fsspec, xxhash, tensorboard,
# tokenizers, huggingface-hub, requests and rich already there, so the list is explicit and --no-deps.
# torchao 0.18 is the release built against torch 2.11. On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
dir="${1:-.whl}"
mkdir -p "$dir"
wheels=(
  torchao==0.18.0
  torchtitan==0.2.2
  torchdata==0.11.0
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.0
  tomli==2.5.0
  trl==1.16.0                # bench/dpo.py's peer (its dependencies are in the image but datasets, above)
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
missing=()
for wheel in "${wheels[@]}"; do
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${platforms[@]}" -d "$dir" "$wheel"; then
    missing+=("$wheel")
  fi
done
ls -la "$dir"
du -sh "$dir"
if ((${#missing[@]})); then
  echo "could not download: ${missing[*]}" >&2
  exit 1
fi
