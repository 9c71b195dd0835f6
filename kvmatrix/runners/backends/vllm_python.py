"""vLLM in-process (phase 2): ``vllm.LLM`` with token-id prompts.

render:    the same engine arguments as the server's flags (vllm_common), as
           ``LLM(**kwargs)``, and the same environment, set in this process
           before vLLM is imported (its engine core and worker processes are
           started with ``spawn`` and inherit it).
start:     ``LLM(...)``. vLLM's output (this process's stdout, the children's
           stdout and stderr) goes to the engine log: fd 1 for the adapter's
           whole life, fd 2 only while the children are started, so the
           runner's own progress lines still reach the terminal.
           Spawn safety: the runner runs as ``python -m kvmatrix.runners``;
           multiprocessing does not re-import a ``<pkg>.__main__`` main module
           in a spawned child, so the children never re-run the cell.
           While the engine runs, ``<cell>.engine.pid`` names this runner's
           process group so the host can reap the children if the runner dies.
effective: ``LLM.llm_engine.vllm_config`` (same mapping as the server's
           ``/server_info``) + the engine log (the CPU worker's OpenMP cores).
measure:   the prompt is the tokenizer's ``apply_chat_template(...,
           add_generation_prompt=True, tokenize=True)`` (what the server
           renders), sent as ``TokensPrompt``. Streaming TTFT does not exist
           in-process: the TTFT proxy is the wall time of a ``max_tokens=1``
           ``generate`` (prefill + one decode step), used as ``ttft_s`` of the
           streaming request too (``extra["ttft_kind"]``). Token counts from
           ``prompt_token_ids`` / ``outputs[0].token_ids``; cached tokens from
           ``RequestOutput.num_cached_tokens``, cross-checked with the
           ``vllm:prefix_cache_queries/hits`` counters of ``LLM.get_metrics()``;
           engine prefill / decode times from ``RequestOutput.metrics``.
stop:      shut the engine core down, reap any child still alive, restore
           fds and environment, remove the run folder.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from kvmatrix.runners.backends import vllm_common as vc
from kvmatrix.runners.backends.base import EngineError, Measurement, Request

TTFT_KIND = "generate_max_tokens_1"


class VllmPython(vc.VllmBackend):
    name = "vllm_python"
    reference_client = "bare LLM.generate on the same token ids, arguments built before the clock"
    engine_args = vc.LLM_ARGS

    def __init__(self, cell, log_dir: Path):
        super().__init__(cell, log_dir)
        self.pid_path = self.log_path.with_suffix(".pid")
        self.llm = None
        self.tokenizer = None
        self._vllm = None
        self._tokens_prompt = None
        self._sampling = None
        self._saved_fds: dict[int, int] = {}
        self._saved_env: dict[str, str | None] = {}

    # -- render ---------------------------------------------------------------
    def render(self) -> dict:
        self.settings = vc.engine_settings(self.flags, self.spec, self.opts, self.model_dir)
        if self.run_dir is None:
            self.run_dir = vc.make_run_dir()
        env = vc.engine_env(self.flags, self.spec, self.opts, self.run_dir)
        env.pop(self.flags.dev_mode_env or "", None)  # server-only
        env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # explicit (the CPU platform forces it anyway)
        kwargs = {**vc.llm_kwargs(self.flags, self.settings, str(self.model_dir)), **self.engine_rest}
        self.rendered = {"kwargs": kwargs, "env": env, "vllm_version": self.version, "flag_table_row": self.flags.label,
                         "options": self.opts.to_dict(), **self.engine_args_record(self.option_overrides)}
        return self.rendered

    # -- start / stop ---------------------------------------------------------
    def start(self) -> None:
        if not self.rendered:
            self.render()
        self._set_env(self.rendered["env"])
        self._redirect(1)
        self._redirect(2)
        self._write_pid()
        t0 = time.monotonic()
        try:
            import vllm  # noqa: PLC0415 - only in this engine's environment

            self._vllm = vllm
            try:
                from vllm.inputs import TokensPrompt  # noqa: PLC0415

                self._tokens_prompt = TokensPrompt
            except ImportError:
                self._tokens_prompt = dict
            self._sampling = vllm.SamplingParams
            self.llm = vllm.LLM(**self.rendered["kwargs"])
            self.tokenizer = self.llm.get_tokenizer()
        except Exception as exc:  # noqa: BLE001 - load failures become a failed cell
            traceback.print_exc()  # into the engine log (fd 2 still points there)
            sys.stderr.flush()
            self._restore_fd(2)
            raise EngineError(f"vLLM LLM() failed: {one_line(exc)}", self.log_tail()) from None
        self.start_seconds = time.monotonic() - t0
        sys.stdout.flush()
        self._restore_fd(2)  # the children keep the log as their stderr; the runner's progress goes back to the terminal

    def stop(self) -> None:
        llm, self.llm = self.llm, None
        self.tokenizer = None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            try:
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown()
            except Exception:  # noqa: BLE001 - the reaping below still runs
                pass
            del llm, engine, core
            gc.collect()
        _reap_children(grace_s=10)
        sys.stdout.flush()
        self._restore_fd(2)
        self._restore_fd(1)
        self._restore_env()
        self.pid_path.unlink(missing_ok=True)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def _set_env(self, env: dict[str, str]) -> None:
        for k, v in env.items():
            self._saved_env.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        tempfile.tempdir = None  # re-read TMPDIR

    def _restore_env(self) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env.clear()
        tempfile.tempdir = None

    def _redirect(self, fd: int) -> None:
        if fd in self._saved_fds:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        (sys.stdout if fd == 1 else sys.stderr).flush()
        self._saved_fds[fd] = os.dup(fd)
        target = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, fd)
        os.close(target)

    def _restore_fd(self, fd: int) -> None:
        saved = self._saved_fds.pop(fd, None)
        if saved is None:
            return
        (sys.stdout if fd == 1 else sys.stderr).flush()
        os.dup2(saved, fd)
        os.close(saved)

    def _write_pid(self) -> None:
        """Name this runner's process group (the engine's children are in it) for the host to reap."""
        if os.getpgid(0) == os.getpid():
            self.pid_path.write_text(str(os.getpid()))

    # -- read back ------------------------------------------------------------
    def effective(self) -> dict:
        engine = self.llm.llm_engine
        cfg = getattr(engine, "vllm_config", None) or engine  # V0 (0.6.x) keeps the configs on the engine
        eff = vc.settings_from_config(vc.config_view(cfg))
        if "block_size" not in eff:
            raise EngineError("vLLM reported no block size; cannot verify block-granular cache reuse",
                              self.log_tail())
        self.cache_granularity = int(eff["block_size"])
        sys.stdout.flush()
        log = self.log_path.read_text(errors="replace")
        eff.update(vc.thread_settings(log, eff.get("device", self.opts.device)))
        eff.update({k: v for k, v in vc.attention_from_log(log).items() if k not in eff})
        eff["temperature"] = self.spec.temperature  # request-level: every request's SamplingParams
        eff["chat_template_source"] = vc.chat_template_source(self.model_dir)
        eff["ttft_kind"] = TTFT_KIND
        eff["cached_tokens_source"] = "RequestOutput.num_cached_tokens"
        isolate = bool(eff.get("prefix_caching")) and self.flags.reset_prefix_cache
        eff["cache_isolation"] = "previous_prompt" if isolate else "none"
        self._isolation = vc.CacheIsolation(self.cache_granularity) if isolate else None
        return {k: v for k, v in eff.items() if v is not None}

    def provenance(self) -> dict:
        return {
            "engine": "vLLM LLM (in-process)",
            "vllm_version": getattr(self._vllm, "__version__", None) or self.version,
            "vllm_distribution": self.dist,
            "vllm_flag_table_row": self.flags.label,
            "llm_kwargs": self.rendered.get("kwargs"),
            "engine_env": {k: v for k, v in (self.rendered.get("env") or {}).items() if k.startswith("VLLM_")},
            "torch_version": vc.dist_version("torch"),
            "transformers_version": vc.dist_version("transformers"),
        }

    # -- tokens ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        key = repr(messages)
        if key not in self._tokens:
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)
            except TypeError:  # transformers without return_dict
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            self._tokens[key] = [int(t) for t in ids]
        return self._tokens[key]

    # -- measure --------------------------------------------------------------
    def _generate(self, ids: list[int], max_tokens: int, ignore_eos: bool = False):
        return self._call(*self._arguments(ids, max_tokens, ignore_eos))

    def _arguments(self, ids: list[int], max_tokens: int, ignore_eos: bool = False) -> tuple:
        params = self._sampling(max_tokens=max_tokens, temperature=self.spec.temperature, seed=self.spec.seed,
                                ignore_eos=ignore_eos)
        return [self._tokens_prompt(prompt_token_ids=ids)], params

    def _call(self, prompts, params):
        return self.llm.generate(prompts, params, use_tqdm=False)[0]

    def _metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            snapshot = self.llm.get_metrics()
        except Exception:  # noqa: BLE001 - stats off or an old version: no cross-check
            return out
        for m in snapshot:
            name = m.name.removesuffix("_total")
            if hasattr(m, "sum") and hasattr(m, "buckets"):
                out[name + "_sum"] = out.get(name + "_sum", 0.0) + float(m.sum)
            elif isinstance(getattr(m, "value", None), (int, float)):
                out[name] = out.get(name, 0.0) + float(m.value)
        return out

    def _try_reset_prefix_cache(self) -> bool:
        return self.llm.reset_prefix_cache() is not False

    def _send_untimed(self, tokens: list[int]) -> None:
        self._generate(tokens, 1)

    def measure(self, request: Request) -> Measurement:
        ids = self.prompt_tokens(request.messages)
        iso = self._isolate(ids)
        before = self._metrics()
        try:
            if request.client == "reference":  # the bare call: its arguments are built before the clock
                prompts, params = self._arguments(ids, request.max_tokens, request.ignore_eos)
                t0 = time.perf_counter()
                out = self.llm.generate(prompts, params, use_tqdm=False)[0]
            else:
                t0 = time.perf_counter()
                out = self._generate(ids, request.max_tokens, request.ignore_eos)
            total = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a dead engine core surfaces here
            raise EngineError(f"vLLM generate failed: {one_line(exc)}", self.log_tail()) from None
        after = self._metrics()
        stats = getattr(out, "metrics", None)
        first_latency = getattr(stats, "first_token_latency", None)
        ttft = None
        extra: dict = {}
        if request.stream:
            if request.max_tokens == 1:
                ttft, extra["ttft_kind"] = total, TTFT_KIND
            elif first_latency is not None:
                ttft, extra["ttft_kind"] = first_latency, "engine_first_token_latency"
        prompt_ids = [int(t) for t in (out.prompt_token_ids or ids)]
        completion = out.outputs[0] if out.outputs else None
        counters = vc.counters_view(before, after)
        cached = getattr(out, "num_cached_tokens", None)
        if cached is None:
            cached = counters.get("metrics_prefix_cache_hits")
        if self._isolation is not None:
            self._isolation.record(prompt_ids)
        prefill_ms = decode_ms = None
        if stats is not None and getattr(stats, "first_token_ts", None) and getattr(stats, "scheduled_ts", None):
            prefill_ms = (stats.first_token_ts - stats.scheduled_ts) * 1000
            if getattr(stats, "last_token_ts", None):
                decode_ms = (stats.last_token_ts - stats.first_token_ts) * 1000
        extra.update({
            "cached_tokens_engine": getattr(out, "num_cached_tokens", None),
            **counters,
            "engine_first_token_latency_s": first_latency,
            "prompt_ids_match_template": prompt_ids == ids,
            **iso,
        })
        vc.write_request_log(self.requests_log, {"stream": request.stream, "max_tokens": request.max_tokens,
                                                 "prompt_tokens": len(prompt_ids), **extra})
        return Measurement(
            ttft_s=ttft,
            total_s=total,
            text=completion.text if completion is not None else "",
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(completion.token_ids) if completion is not None else 0,
            cached_tokens=cached,
            engine_prompt_ms=prefill_ms,
            engine_predicted_ms=decode_ms,
            prompt_token_ids=prompt_ids,
            extra=extra,
        )


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line (pydantic and vLLM errors span several)."""
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), deepest last."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name may contain spaces and parentheses: fields follow the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        nxt = [c for c, p in parents.items() if p in frontier]
        out += nxt
        frontier = nxt
    return out


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"resource_tracker" in fh.read()
    except OSError:
        return False


def _reap_children(grace_s: float) -> None:
    """Stop the engine's child processes that outlived the shutdown (not multiprocessing's resource
    tracker, which cleans shared memory up and exits with this process)."""
    deadline = time.monotonic() + grace_s
    while True:
        left = [p for p in _children_of(os.getpid()) if not _is_resource_tracker(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        if time.monotonic() > deadline - grace_s / 2:
            for p in left:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        time.sleep(0.2)
