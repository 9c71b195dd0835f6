#!/bin/bash
# kvmatrix: submit every part of the array, then the report job (= --submit)
set -euo pipefail
j1=$(sbatch --parsable /work/main/docs/results/slurm-local-2026-12-02/kvmatrix.sbatch)
r=$(sbatch --parsable --dependency=afterany:$j1 /work/main/docs/results/slurm-local-2026-12-02/kvmatrix-report.sbatch)
echo "array job(s): $j1, report job: $r"
