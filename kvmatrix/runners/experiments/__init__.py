"""Experiments: the only place that knows a trial protocol.

Each experiment is a function ``run(backend, ExperimentSpec, progress) -> dict``
returning ``{"trials": {condition: [Trial]}, ...extra fields for the result}``.
"""

from kvmatrix.runners.experiments import invalidation, recompute_scan

EXPERIMENTS = {
    "invalidation": invalidation.run,
    "recompute_scan": recompute_scan.run,
    "batch_sweep": invalidation.run_miss_only,
}
