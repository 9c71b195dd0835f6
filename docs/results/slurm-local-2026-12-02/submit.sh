#!/bin/bash
# submit run slurm-local-2026-12-02: the array job(s), then the report after all of them
set -euo pipefail
deps=afterany
j=$(sbatch --parsable /work/main/docs/results/slurm-local-2026-12-02/kvmatrix.sbatch); deps=$deps:${j%%;*}; echo "array job $j"
j=$(sbatch --parsable /work/main/docs/results/slurm-local-2026-12-02/kvmatrix-2.sbatch); deps=$deps:${j%%;*}; echo "array job $j"
r=$(sbatch --parsable --dependency=$deps /work/main/docs/results/slurm-local-2026-12-02/report.sbatch); echo "report job $r"
