#!/usr/bin/env bash
# How these results were produced on the lent H100 (no internet there): the llama-cpp-python 0.3.36 sdist
# (vendor/llama.cpp trimmed of models/docs/tests/media and unused GPU backends, ~34 MB) and a diskcache wheel
# travelled with the call in .device/; the machine's own python (torch, transformers) generated the models.
set -euo pipefail
export KVMATRIX_CACHE=/tmp/kvcache KVMATRIX_OFFLINE_WHEELS=$PWD/.device/wheels KVMATRIX_MODEL_PYTHON=$(which python3)
mkdir -p /tmp/kvsrc && cp -r .device/src/llama_cpp_python-0.3.36 /tmp/kvsrc/
SRC=/tmp/kvsrc/llama_cpp_python-0.3.36/vendor/llama.cpp
run() { m=$1; name=$2; shift 2
  python3 -m kvmatrix.matrix run --llama-source $SRC --model $m --settle-ms 200 --trials 10 \
    --run-name $name --out /tmp/kvres/$name "$@"; }
for m in gpt2-small llama-1b; do
  run $m $m-fa-off-cram0    --phases 3a,3b --bindings-api chat --flash-attn off --cache-ram 0
  run $m $m-fa-on-cram0     --phases 3a,3b --bindings-api chat --flash-attn on  --cache-ram 0
  run $m $m-fa-off-cram8192 --phases 3a --flash-attn off --cache-ram 8192
  run $m $m-variants        --phases 3b --bindings-api chat --llama-build pip --flash-attn off --cache-ram 0
done
run gpt2-small gpt2-small-variants --phases 3b --bindings-api chat --llama-build pip,stock --flash-attn off --cache-ram 0
run llama-1b   llama-1b-stock      --phases 3b --bindings-api chat --llama-build stock --config 512/256
run gpt2-small gpt2-small-scan  --phases 3a,3b --bindings-api chat --experiments recompute_scan --config 512/256
run gpt2-small gpt2-small-batch --phases 3a,3b --bindings-api chat --experiments batch_sweep --config 512/256
# then, here: python -m kvmatrix.analysis.report docs/results/h100-2026-11-22/*/ --out docs/results/h100-2026-11-22
