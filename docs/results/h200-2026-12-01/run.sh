#!/usr/bin/env bash
# How the H200 results were produced. The lent machine has no network: the llama-cpp-python 0.3.36 sdist
# (trimmed: no .git, models, docs, other GPU backends), the vLLM 0.26.0 wheel (trimmed by tools/trim_wheel.py:
# no FlashAttention-2 / MoE kernels, optional imports in vLLM; Hopper runs FlashAttention-3) and the ~90 small
# wheels vLLM needs travelled in .device/p1..p5 (<= 46 MB each, one device call each, checked by sha256).
# The machine's own python3 (torch 2.11.0+cu130, transformers) generated the models and hosts every venv.
#
# One stage per device call, all back to back (the machine goes back 30 s after a call ends):
#   bash run.sh part N    copy carry part N into /tmp/carry; part 1 also lays out the llama.cpp source
#                         and starts the builds (llama.cpp CUDA, bindings venv, both models) in the background
#   bash run.sh install   join + check the vLLM wheel; create the offline vLLM env in the background
#   bash run.sh measure   start every measurement in the background, in priority order (waits for the builds)
#   bash run.sh wait S    show progress for up to S seconds, until the measurements are done
#   bash run.sh pack      results (+ logs) -> $OUT as tarballs
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
cd "$REPO"
export KVMATRIX_CACHE=/tmp/kvcache KVMATRIX_OFFLINE_WHEELS=/tmp/carry/wheels PYTHONUNBUFFERED=1
KVMATRIX_MODEL_PYTHON=$(command -v python3)
export KVMATRIX_MODEL_PYTHON
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
RES=/tmp/kvres LOG=/tmp/kvlogs VLLM=0.26.0
mkdir -p "$RES" "$LOG" /tmp/carry/wheels
kv() { python3 -m kvmatrix.matrix "$@"; }

run() {  # one measurement run: name, then run options
  local name=$1; shift
  echo "=== $name start $(date +%T)" >> "$LOG/progress"
  if kv run --cuda on --runtime host --settle-ms 100 --trials 10 --vllm-version "$VLLM" \
        --run-name "$name" --out "$RES/$name" "$@" > "$LOG/$name.log" 2>&1; then
    echo "=== $name ok $(date +%T) $(tail -1 "$LOG/$name.log")" >> "$LOG/progress"
  else
    echo "=== $name FAILED $(date +%T): $(tail -2 "$LOG/$name.log" | tr '\n' ' ')" >> "$LOG/progress"
  fi
}

case "${1:-}" in
part)
  n=$2
  cp -r ".device/p$n/." /tmp/carry/
  (cd /tmp/carry && grep -E '^[0-9a-f]{64}  ' "$REPO/.device/MANIFEST.txt" | sha256sum -c --ignore-missing --quiet)
  echo "part $n ok: $(du -sh /tmp/carry | cut -f1) in /tmp/carry"
  if [ "$n" = 1 ]; then
    src=$KVMATRIX_CACHE/sources/llama-cpp-python-0.3.36
    mkdir -p "$src" && tar -xzf /tmp/carry/llama_cpp_python-0.3.36-trimmed.tar.gz -C "$src"
    echo '{"version": "0.3.36", "origin": "trimmed sdist carried to this host"}' > "$src/.complete"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    nvcc --version | tail -1
    setsid nohup bash "$0" builds > "$LOG/builds.log" 2>&1 < /dev/null &
    echo "builds started (log $LOG/builds.log)"
  fi
  ;;
builds)  # background: the models beside the llama.cpp build (they use its converter, not its binaries)
  (kv model --model gpt2-small --cuda on > "$LOG/model-gpt2-small.log" 2>&1 &&
   kv model --model llama-1b --cuda on > "$LOG/model-llama-1b.log" 2>&1; echo "models rc=$?" >> "$LOG/progress") &
  kv build --cuda on > "$LOG/build.log" 2>&1; echo "build rc=$?" >> "$LOG/progress"
  wait
  touch "$LOG/builds.done"
  ;;
install)
  cat /tmp/carry/vllm/vllm.whl.part-* > "/tmp/carry/wheels/vllm-$VLLM-cp38-abi3-manylinux_2_28_x86_64.whl"
  (cd /tmp/carry && sha256sum -c "$REPO/.device/WHEEL.sha256")
  rm -rf /tmp/carry/vllm
  echo "wheels: $(ls /tmp/carry/wheels | wc -l)"
  setsid nohup bash -c "python3 -c \"from kvmatrix.matrix import console, vllm; console.run_main(lambda: print('VLLM_ENV', vllm.ensure_env('$VLLM', 'cuda').python))\" > $LOG/vllm-env.log 2>&1; touch $LOG/vllm-env.done" < /dev/null > /dev/null 2>&1 &
  tail -3 "$LOG/progress" 2>/dev/null || true
  ;;
measure)
  setsid nohup bash "$0" measurements > "$LOG/measure.log" 2>&1 < /dev/null &
  echo "measurements started"
  ;;
measurements)  # background, in priority order: the four-phase table first
  while [ ! -f "$LOG/builds.done" ] || [ ! -f "$LOG/vllm-env.done" ]; do sleep 3; done
  grep -q VLLM_ENV "$LOG/vllm-env.log" || { echo "=== vLLM env FAILED: $(tail -1 "$LOG/vllm-env.log")" >> "$LOG/progress"; }
  run gpt2-small-llama --model gpt2-small --phases 3a,3b --bindings-api chat
  run gpt2-small-vllm --model gpt2-small --phases 1,2
  run llama-1b-llama --model llama-1b --phases 3a,3b --bindings-api chat
  run llama-1b-vllm --model llama-1b --phases 1,2
  for m in gpt2-small llama-1b; do
    run "$m-fa-on" --model "$m" --phases 3a,3b --bindings-api chat --flash-attn on --config 256/512
  done
  for m in gpt2-small llama-1b; do
    run "$m-cram8192" --model "$m" --phases 3a --cache-ram 8192 --config 512/256
  done
  run gpt2-small-llama-scan --model gpt2-small --phases 3a,3b --bindings-api chat --experiments recompute_scan \
      --config 512/256
  run gpt2-small-llama-sweep --model gpt2-small --phases 3a,3b --bindings-api chat --experiments batch_sweep \
      --config 512/256 --batch-sizes 64,256,2048
  run gpt2-small-vllm-scan-sweep --model gpt2-small --phases 2 --experiments recompute_scan,batch_sweep \
      --config 512/256 --batch-sizes 2048,64
  for m in gpt2-small llama-1b; do
    run "$m-pip" --model "$m" --phases 3b --bindings-api chat --llama-build pip --config 256/512
  done
  echo "=== all done $(date +%T)" >> "$LOG/progress"
  ;;
wait)
  end=$((SECONDS + ${2:-540}))
  while [ $SECONDS -lt $end ] && ! grep -q "all done" "$LOG/progress" 2>/dev/null; do sleep 10; done
  cat "$LOG/progress" 2>/dev/null || true
  for f in "$LOG"/*.log; do [ -f "$f" ] && echo "--- $(basename "$f"): $(tail -1 "$f" | cut -c1-200)"; done
  ;;
pack)
  out=${OUT:?}
  tar -czf "$out/results.tar.gz" -C "$RES" --exclude='*.engine.log' --exclude='*.requests.jsonl' .
  tar -czf "$out/logs.tar.gz" -C /tmp kvlogs
  find "$RES" \( -name '*.engine.log' -o -name '*.requests.jsonl' \) -size -4M -print0 |
    tar -czf "$out/engine-logs.tar.gz" --null -T - 2>/dev/null || true
  ls -la "$out"
  ;;
*)
  echo "usage: bash run.sh part N | install | measure | wait SECONDS | pack" >&2
  exit 2
  ;;
esac
