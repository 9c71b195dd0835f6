#!/usr/bin/env bash
# How docs/results/slurm-local-2026-12-02 was made: a real single-host Slurm (Debian's slurmctld/slurmd 22.05 +
# munge, started by tests/slurm_cluster.py as root, MaxArraySize=3 so the 4-task array is split in two), the plan
# submitted held, task 2 cancelled, the rest released; then status, the resubmission line it printed, status again.
set -euo pipefail
cd "$(dirname "$0")/../../.."
RUN=${RUN:-$PWD/docs/results/slurm-local-2026-12-02}
PY=${PY:-python3}
CL=$(mktemp -d)
$PY -m tests.slurm_cluster "$CL" 3 > "$CL/cluster.out" 2>&1 &
cluster=$!
trap 'kill $cluster 2>/dev/null; wait $cluster 2>/dev/null || true' EXIT
for _ in $(seq 90); do grep -q SLURM_CONF "$CL/cluster.out" 2>/dev/null && break; sleep 1; done
export SLURM_CONF=$CL/slurm.conf
sinfo
ids=$(SBATCH_HOLD=1 $PY -m kvmatrix.matrix matrix --phases 3a,3b --llama-build server,shared --bindings-api chat \
        --config 512/256 --config 256/512 --trials 5 --runtime host --threads 1 \
        --emit slurm --out "$RUN" --run-name slurm-local-2026-12-02 --max-parallel 2 --sbatch-arg=--cpus-per-task=1 --sbatch-arg=--mem=4096 --submit)
echo "job ids: $ids"
set -- $ids
scancel "${1}_2"                      # plan task 2 (index 2 of the first array) never runs
scontrol release "$@"
while [ -n "$(squeue -h -r)" ]; do sleep 2; done
$PY -m kvmatrix.matrix status "$RUN" | tee "$RUN/status-after-cancel.txt" || true
line=$(grep -m1 'sbatch --array=' "$RUN/status-after-cancel.txt" | sed 's/^ *//')
echo "resubmitting: $line"
sbatch --wait ${line#sbatch }
$PY -m kvmatrix.matrix status "$RUN" | tee "$RUN/status.txt"
sbatch --wait "$RUN/report.sbatch"    # the merged report again, now with every cell
