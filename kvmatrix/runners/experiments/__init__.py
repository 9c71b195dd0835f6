"""Experiments: the only place that knows a trial protocol.

Each experiment is a function ``run(backend, ExperimentSpec, progress) -> dict``
returning ``{"trials": {condition: [Trial]}, ...extra fields for the result}``.
"""

from kvmatrix.runners.experiments import invalidation

EXPERIMENTS = {
    "invalidation": invalidation.run,
}
