"""Experiments: the only place that knows a trial protocol.

Each experiment is a function ``run(backend, ExperimentSpec, progress) -> dict``
returning ``{"trials": {condition: [Trial]}, ...extra fields for the result}``.
"""

from kvmatrix.runners.experiments import invalidation, recompute_scan, slot_eviction


def _prefix_reuse(backend, spec, progress=None) -> dict:
    # imported here: it needs aiohttp (the HTTP client), which the host side does not have
    from kvmatrix.runners.experiments import prefix_reuse  # noqa: PLC0415

    return prefix_reuse.run(backend, spec, progress)


EXPERIMENTS = {
    "invalidation": invalidation.run,
    "recompute_scan": recompute_scan.run,
    "batch_sweep": invalidation.run_miss_only,
    "prefix_reuse": _prefix_reuse,
    "slot_eviction": slot_eviction.run,
}
