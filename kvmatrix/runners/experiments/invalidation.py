"""The invalidation experiment: T1 warm [A,B] -> T2 hit [A,B,Q] / T3 miss [B,Q].

Per trial (the original protocol), for the trial's condition:

1. warm [A,B] generating 1 token, timed as ``warmup_time_ms``;
2. settle; 3. timed streaming query (hit: [A,B,Q], miss: [B,Q]) -> TTFT;
4. re-warm; settle; non-streaming 1-token query -> ``ttft_non_streaming_ms``;
5. re-warm; settle; throughput run: the same query generating
   ``max_output_tokens`` tokens with EOS ignored -> total time and tokens/s.

Conditions are interleaved (warm-up trials of both first, then hit, miss,
hit, miss, ...) so drift cannot masquerade as a hit/miss effect. A, B and Q
are the same in every trial of a cell, so each warm-up starts from what the
previous query left in the cache (the "cascade").

Every timed query is checked against the engine's own cached-token count:
expected = longest common token prefix of what the engine held and the
query, at the engine's cache granularity. What the engine held is tracked per
slot (the slot that served each request, as the adapter reports it; engines
with one sequence are slot 0), so the same check holds for a server with
several slots (``slot_eviction``).

``Tracker`` and ``measure_trial`` are shared by every trial-protocol
experiment; ``Tracker.settle`` is the ONE settle pause (keep-warm or sleep,
then an NVML sample of the device state just before the next request).
"""

from __future__ import annotations

from collections.abc import Callable

from kvmatrix.runners.backends.base import Backend, Measurement, Request
from kvmatrix.runners.calibration import block, breakdown
from kvmatrix.runners.device import Nvml
from kvmatrix.runners.keep_warm import open_keep_warm, settle
from kvmatrix.runners.results import Trial
from kvmatrix.runners.spec import ExperimentSpec
from kvmatrix.runners.workload import Contexts, Vocabulary, expected_cached, verify

CONDITIONS = {"cache_hit": ("a", "b", "q"), "cache_miss": ("b", "q")}
WARM = ("a", "b")


def schedule(spec: ExperimentSpec, conditions: tuple[str, ...] = tuple(CONDITIONS)) -> list[tuple[str, int, bool]]:
    """(condition, trial index, is warm-up) in run order: warm-ups, then interleaved."""
    order: list[tuple[str, int, bool]] = []
    for i in range(spec.warmup_trials):
        for cond in conditions:
            order.append((cond, i, True))
    for i in range(spec.num_trials):
        for cond in conditions:
            order.append((cond, i, False))
    return order


def order_labels(plan: list[tuple[str, int, bool]]) -> list[str]:
    """The run order as recorded in the result: ``cache_hit:0w`` (warm-up), ``cache_miss:3``."""
    return [f"{c}:{i}{'w' if w else ''}" for c, i, w in plan]


class Tracker:
    """Runs requests; remembers what each slot of the engine holds, to compute the expected cache reuse."""

    def __init__(self, backend: Backend, keep_warm: bool = False):
        self.backend = backend
        self.held: dict[int, list[int]] = {}  # slot -> the prompt tokens it last evaluated
        self.nvml = Nvml.open()
        self.keep_warm = open_keep_warm(keep_warm, backend.spec.n_gpu_layers)

    def run(self, request: Request) -> tuple[Measurement, int, bool]:
        """Measure one request: (measurement, expected cached tokens, verified). A refused request
        (``ContextExceeded``) propagates and leaves what the slots hold unchanged."""
        m = self.backend.measure(request)
        if self.nvml is not None:
            m.extra["device"] = self.nvml.sample()
        # what the engine evaluated: its own read-back where the adapter has one, else the ids sent or
        # the adapter's rendering of the messages (untimed either way)
        if m.prompt_token_ids is not None:
            prompt = m.prompt_token_ids
        elif request.prompt_ids is not None:
            prompt = list(request.prompt_ids)
        else:
            prompt = self.backend.prompt_tokens(request.messages)
        slot = m.id_slot or 0
        g = self.backend.cache_granularity
        expected = expected_cached(self.held.get(slot), prompt, g)
        self.held[slot] = prompt
        return m, expected, verify(m.cached_tokens, expected, g)

    def settle(self, ms: int) -> dict | None:
        """The pause before the next request; returns the NVML sample taken at its end (GPU hosts)."""
        settle(self.keep_warm, ms / 1000.0)
        return self.nvml.sample() if self.nvml is not None else None

    def close(self) -> dict:
        """Release the keep-warm buffer; returns what the result records about keep-warm."""
        state = self.keep_warm.to_dict()
        if self.keep_warm.warmer is not None:
            self.keep_warm.warmer.close()
        return state


def measure_trial(tracker: Tracker, warm_msgs: list[dict], msgs: list[dict], spec: ExperimentSpec,
                  idx: int, is_warmup: bool, throughput: bool = True,
                  warm_slot: int | None = 0, slot: int | None = 0,
                  prepare: Callable[[], object] | None = None) -> Trial:
    """One trial of the protocol for the query ``msgs`` after warming ``warm_msgs``.

    ``warm_slot`` / ``slot``: where the warm-ups and the queries go (see ``Request.slot``).
    ``prepare``: untimed requests run before every warm-up, to set the state the condition needs.
    The warm-up right after the timed query is recorded as the re-warm: what re-establishing
    [A,B] costs after this condition's query (after a miss: the "miss warm-up").
    With ``spec.calibration`` the same query is also sent, from the same re-warmed and settled
    state, through the reference client (before the harness query on odd trials, after it on
    even ones) and, where the backend has one, on its token-id path (``runners/calibration.py``).
    """

    def warm() -> tuple[Measurement, dict | None]:
        if prepare is not None:
            prepare()
        m, _, _ = tracker.run(Request(warm_msgs, max_tokens=1, stream=False, slot=warm_slot))
        return m, tracker.settle(spec.settle_ms)

    def control(**kw) -> tuple[Measurement, bool]:
        warm()
        m, _, ok = tracker.run(Request(msgs, max_tokens=1, stream=True, slot=slot, **kw))
        return m, ok

    backend = tracker.backend
    calibrate = spec.calibration and bool(backend.reference_client)
    ref = tok = None
    if calibrate and idx % 2 == 1:
        ref = control(client="reference")
    w, settled = warm()
    q, expected, ok_q = tracker.run(Request(msgs, max_tokens=1, stream=True, slot=slot))
    rw, _ = warm()
    ns, _, ok_ns = tracker.run(Request(msgs, max_tokens=1, stream=False, slot=slot))
    if calibrate and idx % 2 == 0:
        ref = control(client="reference")
    if calibrate and backend.token_id_path:
        tok = control(prompt_ids=backend.prompt_tokens(msgs))
    tp = None
    if throughput:
        warm()
        tp, _, _ = tracker.run(Request(msgs, max_tokens=spec.max_output_tokens, stream=False, ignore_eos=True,
                                       slot=slot))
    ttft_ms = (q.ttft_s if q.ttft_s is not None else q.total_s) * 1000
    ns_ms = ns.total_s * 1000
    completion = (tp.completion_tokens or 0) if tp else (q.completion_tokens or 0)
    return Trial(
        **_controls(ref, tok),
        breakdown=breakdown(ttft_ms, _ms(q.send_s), _ms(q.first_byte_s), q.engine_prompt_ms),
        trial=idx,
        warmup=is_warmup,
        ttft_ms=ttft_ms,
        ttft_non_streaming_ms=ns_ms,
        overhead_ms=ttft_ms - ns_ms,
        engine_prompt_ms=q.engine_prompt_ms,
        engine_predicted_ms=q.engine_predicted_ms,
        total_time_ms=tp.total_s * 1000 if tp else None,
        throughput=(completion / tp.total_s if tp.total_s > 0 else 0.0) if tp else None,
        warmup_time_ms=w.total_s * 1000,
        prompt_tokens=q.prompt_tokens or 0,
        completion_tokens=completion,
        cached_tokens=q.cached_tokens,
        expected_cached_tokens=expected,
        cache_granularity=tracker.backend.cache_granularity,
        cache_verified=ok_q and ok_ns,
        device=q.extra.get("device"),
        device_settle=settled,
        cached_tokens_source=q.extra.get("cached_tokens_source"),
        warmup_prompt_tokens=w.prompt_tokens,
        warmup_cached_tokens=w.cached_tokens,
        id_slot=q.id_slot,
        warmup_id_slot=w.id_slot,
        rewarm_time_ms=rw.total_s * 1000,
        rewarm_cached_tokens=rw.cached_tokens,
        rewarm_id_slot=rw.id_slot,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _ttft_ms(m: Measurement) -> float:
    return (m.ttft_s if m.ttft_s is not None else m.total_s) * 1000


def _controls(ref: tuple[Measurement, bool] | None, tok: tuple[Measurement, bool] | None) -> dict:
    """The Trial fields of the reference and token-id controls (absent ones stay None)."""
    out: dict = {}
    if ref is not None:
        m, ok = ref
        out.update(reference_ttft_ms=_ttft_ms(m), reference_cached_tokens=m.cached_tokens,
                   reference_engine_prompt_ms=m.engine_prompt_ms, reference_verified=ok)
    if tok is not None:
        m, ok = tok
        out.update(tokenid_ttft_ms=_ttft_ms(m), tokenid_cached_tokens=m.cached_tokens,
                   tokenid_engine_prompt_ms=m.engine_prompt_ms, tokenid_verified=ok)
    return out


def calibration_block(backend: Backend, spec: ExperimentSpec, trials: dict[str, list[Trial]]) -> dict:
    """The cell's ``calibration`` block (or ``{"enabled": False, ...}``): see runners/calibration.py."""
    if not spec.calibration:
        return {"enabled": False, "reason": "switched off (--no-calibration)"}
    if not backend.reference_client:
        return {"enabled": False, "reason": f"{backend.name} has no reference client"}
    return block({c: [t.to_dict() for t in ts] for c, ts in trials.items()}, backend.reference_client,
                 backend.token_id_path)


def run(backend: Backend, spec: ExperimentSpec, progress=None, conditions: tuple[str, ...] = tuple(CONDITIONS)) -> dict:
    vocab = Vocabulary.from_engine(backend.tokenize)
    cfg = spec.config
    ctx: Contexts = vocab.contexts(cfg.a, cfg.b, cfg.q, seed=spec.seed)
    tracker = Tracker(backend, spec.keep_warm)
    warm_msgs = ctx.messages(*WARM)
    trials: dict[str, list[Trial]] = {c: [] for c in conditions}
    plan = [step for step in schedule(spec) if step[0] in conditions]
    try:
        for step, (cond, idx, is_warmup) in enumerate(plan, 1):
            trial = measure_trial(tracker, warm_msgs, ctx.messages(*CONDITIONS[cond]), spec, idx, is_warmup)
            trials[cond].append(trial)
            if progress:
                progress(f"{cond} trial {idx}{' (warm-up)' if is_warmup else ''}: ttft {trial.ttft_ms:.1f} ms, "
                         f"cached {trial.cached_tokens}/{trial.prompt_tokens} "
                         f"(expected {trial.expected_cached_tokens})", step, len(plan))
    finally:
        keep_warm = tracker.close()
    return {
        "trials": trials,
        "order": order_labels(plan),
        "workload": {"a_tokens": cfg.a, "b_tokens": cfg.b, "q_tokens": cfg.q, "seed": spec.seed,
                     "words": len(vocab.words), "q_text": ctx.q.strip()},
        "keep_warm": keep_warm,
        "calibration": calibration_block(backend, spec, trials),
    }


def run_miss_only(backend: Backend, spec: ExperimentSpec, progress=None) -> dict:
    """batch_sweep: the miss condition alone; the cell's runtime carries the n_batch under test."""
    return run(backend, spec, progress, conditions=("cache_miss",))
