"""llama-server (phase 3a): chat completions over HTTP with a pinned slot.

render:    RuntimeSpec -> llama-server flags, by what THIS binary's --help offers
           (``-fa on|off`` vs the older boolean ``-fa``; ``--cache-ram`` and
           ``--fit`` exist only in newer builds).
start:     own process group on 127.0.0.1:<free port>, bounded /health wait (``ServerBackend``).
effective: ``/props`` (slot context, slots) + the start-up log (n_ctx, n_batch,
           n_ubatch, flash attention, KV types, threads, prompt-cache size,
           offloaded layers).
measure:   ``/v1/chat/completions`` with ``id_slot`` pinned (``Request.slot``; None lets
           the server choose) and ``cache_prompt``; the engine's ``timings`` (cache_n,
           prompt_n, prompt_ms, predicted_ms) come with the non-streaming body and the
           final streamed chunk. With several slots the serving slot is read back from
           ``/slots`` after the request (the slot whose ``id_task`` is the newest), outside
           the timed region; a prompt that does not fit the slot's context is refused by
           the server (HTTP 400 ``exceed_context_size_error``) -> ``ContextExceeded``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from kvmatrix.runners.backends import llamacpp_common as common
from kvmatrix.runners.backends.base import ContextExceeded, EngineError, Measurement, Request
from kvmatrix.runners.backends.http import HttpClient, HttpError
from kvmatrix.runners.backends.process import HOST
from kvmatrix.runners.backends.server import ServerBackend
from kvmatrix.runners.engine_args import Rules, controlled

#: every llama-server flag ``render`` sets (all aliases, checked against the b4094 --help in tests/data and
#: current llama.cpp's common/arg.cpp) -> what sets it instead; ``--engine-arg`` refuses them
SERVER_CONTROLLED = controlled((
    (("-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file"),
     "the model (the cell's GGUF)", "use --model (and --quant)"),
    (("--host", "--port"), "the server address", "it serves on 127.0.0.1 at a free port: leave it out"),
    (("-c", "--ctx-size"), "n_ctx"),
    (("-b", "--batch-size"), "n_batch"),
    (("-ub", "--ubatch-size"), "n_ubatch"),
    (("-np", "--parallel"), "n_parallel"),
    (("-ngl", "--gpu-layers", "--n-gpu-layers"), "n_gpu_layers"),
    (("-ctk", "--cache-type-k"), "cache_type_k"),
    (("-ctv", "--cache-type-v"), "cache_type_v"),
    (("-t", "--threads"), "n_threads"),
    (("-tb", "--threads-batch"), "n_threads_batch"),
    (("-s", "--seed"), "seed"),
    (("--temp", "--temperature"), "temperature"),
    (("-fa", "--flash-attn"), "flash_attn"),
    (("-cram", "--cache-ram"), "cache_ram_mib"),
    (("--metrics", "--slots", "--no-slots"), "an endpoint kvmatrix reads (/metrics, /slots)", "leave it out"),
    (("-lv", "--verbosity", "--log-verbosity", "-v", "--verbose", "--log-verbose", "--log-disable", "--log-file"),
     "the start-up log kvmatrix reads back (-lv 4)", "leave it out"),
    (("--jinja", "--no-jinja"), "the chat template (the GGUF's own, --jinja where the server has it)",
     "leave it out"),
    (("-fit", "--fit"), "--fit off (the server never resizes what kvmatrix sets)", "leave it out"),
))
#: --engine-arg items go after everything render sets; llama.cpp's parser has no --flag=VALUE form
ENGINE_ARGS = Rules("argv", controlled=SERVER_CONTROLLED, split_inline=True)


class LlamaCppHttp(ServerBackend):
    name = "llamacpp_http"
    server_name = "llama-server"
    start_timeout_s = 120.0
    engine_args = ENGINE_ARGS

    def __init__(self, cell, log_dir: Path):
        super().__init__(cell, log_dir)
        self.server = Path(cell.engine.get("server") or "llama-server")
        self.model_path = cell.model.get("gguf")
        self._help: str | None = None
        self._template_cache: dict[str, list[int]] = {}
        #: POST /apply-template exists (newer servers); else the prompt is read back from /slots
        self._apply_template = True
        #: chat responses carry ``timings`` (None: not known before the first response)
        self._chat_timings: bool | None = None
        #: ``llamacpp:prompt_tokens_total`` after the last request (servers without chat timings), so the next
        #: request needs no /metrics read between its settle pause and its send
        self._counter: float | None = None

    # -- render ---------------------------------------------------------------
    def help_text(self) -> str:
        if self._help is None and self.external_url:
            self._help = ""  # an existing server: its binary is not ours to run; its flags are unknown
        if self._help is None:
            if not self.server.is_file():
                raise EngineError(f"llama-server not found at {self.server}; build it with nox -s build")
            out = subprocess.run([str(self.server), "--help"], capture_output=True, text=True, timeout=60)
            self._help = out.stdout + out.stderr
        return self._help

    def render(self) -> dict:
        if self.external_url:
            return self.render_external()
        s, h = self.spec, self.help_text()
        argv = [
            str(self.server), "-m", self.model_path, "--host", HOST, "--port", str(self.port),
            "-c", str(s.n_ctx), "-b", str(s.n_batch), "-ub", str(s.n_ubatch), "-np", str(s.n_parallel),
            "-ngl", str(common.gpu_layers_arg(s.n_gpu_layers)),
            "-ctk", s.cache_type_k, "-ctv", s.cache_type_v,
            "-t", str(s.n_threads), "-tb", str(s.n_threads_batch),
            "--seed", str(s.seed), "--temp", str(s.temperature),
            "--metrics", "--slots",
        ]
        argv += render_flash_attn(s.flash_attn, h)
        if "--cache-ram" in h:
            argv += ["--cache-ram", str(s.cache_ram_mib)]
        elif s.cache_ram_mib != 0:
            raise EngineError("this llama-server has no --cache-ram (no host-RAM prompt cache); request cache_ram_mib=0")
        else:
            self.release_gaps["cache_ram_mib"] = ("no --cache-ram in this llama-server (--help): it has no host-RAM "
                                                  "prompt cache, so 0 is what it runs; not read back")
        if re.search(r"--fit\b", h):
            argv += ["--fit", "off"]  # never let the server resize unset arguments behind our back
        if "--no-webui" in h:
            argv.append("--no-webui")
        if "--jinja" in h:
            argv.append("--jinja")
        else:
            self.release_gaps["chat_template"] = ("no --jinja in this llama-server (--help): chats are formatted by "
                                                  "its built-in template matcher, not by the GGUF's Jinja template")
        if re.search(r"-lv,\s*--verbosity", h):
            argv += ["-lv", "4"]  # prints the llama_context / KV cache lines read back by effective()
        else:
            self.release_gaps["start_log"] = ("no -lv in this llama-server (--help): the context lines are read at "
                                              "its default verbosity")
        extra = self.split_engine_args()[1]
        flags = [a for a in extra if re.fullmatch(r"--?[a-zA-Z][a-zA-Z0-9-]*", a)]
        unknown = [a for a in flags if a not in common.help_flags(h)] if flags else []
        if unknown:
            raise EngineError(f"--engine-arg {unknown[0]}: this llama-server has no such flag (see its --help)")
        argv += extra  # last: after everything kvmatrix renders
        self.rendered = {"argv": argv, **self.engine_args_record()}
        return self.rendered

    @classmethod
    def identify(cls, client) -> dict:
        """An existing server's model and engine documents, from its API (--base-url; before any cell)."""
        props = client.get_json("/props")
        path = props.get("model_path") or ""
        alias = props.get("model_alias")
        name = (alias if alias and alias != path else Path(path).name.removesuffix(".gguf")) or "llama-server model"
        return {"model": {"name": name, "gguf": None, "hf_dir": None, "server_model_path": path or None},
                "engine": {"build_info": props.get("build_info")}}

    # -- start (ServerBackend) ------------------------------------------------
    def ready(self) -> bool:
        return self.client.get_json("/health", timeout_s=2).get("status") == "ok"

    # -- read back ------------------------------------------------------------
    def effective(self) -> dict:
        props = self.client.get_json("/props")
        log = self.log_path.read_text(errors="replace")
        eff = common.parse_context_log(log)
        eff["n_parallel"] = props.get("total_slots")
        slot_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        if slot_ctx is not None and eff.get("n_ctx") is None:
            eff["n_ctx"] = slot_ctx * (eff["n_parallel"] or 1)
        eff["n_ctx_per_slot"] = slot_ctx
        m = re.search(r"n_ctx_slot\s*=\s*\d+,\s*kv_unified\s*=\s*'(\w+)'", log)
        if m:
            eff["kv_unified"] = m.group(1) == "true"  # recorded, not a RuntimeSpec setting: slots split n_ctx when false
        m = re.search(r"n_threads\s*=\s*(\d+)\s*\(n_threads_batch\s*=\s*(\d+)\)", log)
        if m:
            eff["n_threads"], eff["n_threads_batch"] = int(m.group(1)), int(m.group(2))
        if not self.external_url:  # an existing server's --cache-ram shows only in its log, which is not ours
            eff["cache_ram_mib"] = parse_cache_ram(log, self.spec.cache_ram_mib, "--cache-ram" in self.help_text())
        defaults = props.get("default_generation_settings") or {}
        params = defaults.get("params")
        if params is not None:
            eff["seed"] = params.get("seed")
            eff["temperature"] = params.get("temperature")
        else:  # older servers (e.g. b4094): flat defaults, whose seed is the slot default, not --seed
            eff["temperature"] = defaults.get("temperature")
            self.release_gaps["seed"] = (f"/props of this llama-server reports the slot default seed "
                                         f"{defaults.get('seed')}, not --seed; every request sends "
                                         f"seed={self.spec.seed}; not read back")
        if "n_gpu_layers" not in eff and ("no usable GPU found" in log
                                          or "not compiled with GPU offload support" in log):  # newer / older text
            eff["n_gpu_layers"] = 0  # the server ignores -ngl without a GPU backend
        # request-level: every request sends cache_prompt from the spec (see measure)
        eff["prefix_caching"] = self.spec.prefix_caching
        m = re.search(r"^build: (\d+) \((\w+)\)", log, re.M)
        eff["build_info"] = props.get("build_info") or (f"b{m.group(1)}-{m.group(2)}" if m else None)
        eff["chat_template_source"] = ("the server's (--jinja unknown)" if self.external_url else
                                       "gguf" if "--jinja" in self.help_text() else "built-in matcher") \
            if props.get("chat_template") else "none"
        self._apply_template = self._has_apply_template()
        if not self._apply_template:
            self.release_gaps["prompt_tokens"] = ("no /apply-template in this llama-server: the prompt it evaluated "
                                                  "is read back from /slots (the slot's prompt) and tokenized by "
                                                  "its /tokenize, after each request, outside the timed region")
        self._props = props
        if self.external_url:  # request-level: every request sends them (the server's defaults are not used)
            eff["seed"], eff["temperature"] = self.spec.seed, self.spec.temperature
            self._check_external_isolation()
        return {k: v for k, v in eff.items() if v is not None}

    def _check_external_isolation(self) -> None:
        """An existing server must forget an evicted prompt, or no miss is a miss: P, then Q, then P again on slot 0
        (untimed, /completion); a P that comes back cached was kept elsewhere (a host-RAM prompt cache, another
        slot): refused, naming the flags. A server kvmatrix starts gets -np / --cache-ram from the spec."""
        def send(words: str) -> int:
            body = self.client.post_json("/completion", {"prompt": words, "n_predict": 1, "cache_prompt": True,
                                                         "id_slot": 0, "temperature": 0})
            return int((body.get("timings") or {}).get("cache_n") or 0)

        try:
            self.client.get_text("/metrics")  # counters read around requests (and the memory read-out)
        except HttpError as exc:
            raise EngineError(f"the llama-server at {self.external_url} has no /metrics (HTTP {exc.status}): start it "
                              "with --metrics") from None
        p = " ".join(f"alpha{i} beta{i}" for i in range(96))
        q = " ".join(f"gamma{i} delta{i}" for i in range(96))
        send(p)
        send(q)
        kept = send(p)
        if kept > 8:
            raise EngineError(f"the llama-server at {self.external_url} served an evicted prompt from its cache "
                              f"({kept} tokens cached after another prompt took slot 0): a host-RAM prompt cache or "
                              "other slots keep prompts, so misses cannot be isolated; start it with --cache-ram 0 "
                              "-np 1 (or --kv-unified off)")

    def begin_cell(self, cell, reused: bool) -> dict | None:
        """A reused server: one slot needs nothing (every protocol starts with a discarded warm-up that
        overwrites it); several slots or a host-RAM prompt cache hold earlier cells' prompts that no API
        empties here (slot erase needs --slot-save-path), so those take a fresh server."""
        if not reused:
            return None
        if self.spec.cache_ram_mib != 0:
            return {"restart": "the --cache-ram prompt cache holds earlier cells' prompts"}
        if self.spec.n_parallel > 1:
            return {"restart": f"{self.spec.n_parallel} slots hold earlier cells' prompts"}
        return {"slot": "kept; overwritten by the first (discarded) warm-up"}

    def provenance(self) -> dict:
        log = self.log_path.read_text(errors="replace")
        m = re.search(r"system_info:\s*(.+)", log)
        return {
            "engine": "llama-server",
            "engine_build_info": getattr(self, "_props", {}).get("build_info"),
            "system_info": m.group(1).strip() if m else None,
            "server_binary": None if self.external_url else str(self.server),
            "server_argv": self.rendered.get("argv"),
            **({"started_by_kvmatrix": False, "base_url": self.external_url,
                "model_path": getattr(self, "_props", {}).get("model_path")} if self.external_url else {}),
        }

    # -- tokens ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        body = self.client.post_json("/tokenize", {"content": text, "add_special": False, "parse_special": False})
        return [t if isinstance(t, int) else t["id"] for t in body["tokens"]]

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        key = repr(messages)
        if key not in self._template_cache:
            if not self._apply_template:
                raise EngineError("this llama-server has no /apply-template; the prompt of these messages is known "
                                  "only after a request (read back from /slots)")
            prompt = self.client.post_json("/apply-template", {"messages": messages})["prompt"]
            self._template_cache[key] = self._tokenize_prompt(prompt)
        return self._template_cache[key]

    def _tokenize_prompt(self, prompt: str) -> list[int]:
        """The ids the server evaluates for a formatted prompt (special tokens parsed, as for chat requests)."""
        body = self.client.post_json("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})
        return [t if isinstance(t, int) else t["id"] for t in body["tokens"]]

    def _has_apply_template(self) -> bool:
        """Whether POST /apply-template exists (it renders only: no slot or cache is touched)."""
        try:
            self.client.post_json("/apply-template", {"messages": [{"role": "user", "content": "x"}]})
        except HttpError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _evaluated_prompt(self, slot: int, messages: list[dict]) -> list[int]:
        """Old servers: the prompt the slot just evaluated, from /slots, tokenized (cached per messages)."""
        key = repr(messages)
        if key not in self._template_cache:
            slots = self.client.get_json("/slots", timeout_s=10)
            prompt = next((s.get("prompt") for s in slots if s.get("id") == slot), None)
            if not isinstance(prompt, str):
                raise EngineError(f"/slots has no prompt for slot {slot}; cannot read back the evaluated prompt",
                                  self.log_tail())
            self._template_cache[key] = self._tokenize_prompt(prompt)
        return self._template_cache[key]

    def _prompt_counter(self) -> float | None:
        """``llamacpp:prompt_tokens_total`` (prompt tokens the server evaluated, all requests), from /metrics."""
        m = re.search(r"^llamacpp:prompt_tokens_total\s+(\S+)", self.client.get_text("/metrics"), re.M)
        return float(m.group(1)) if m else None

    # -- measure --------------------------------------------------------------
    def _counts_prompt_tokens(self) -> bool:
        """Whether requests need the prompt-token counter: chat responses without timings (or not known yet)."""
        return self._chat_timings is not True

    def _payload(self, request: Request) -> tuple[str, dict]:
        """The request as llama-server takes it: chat completions, or ``/completion`` with token ids."""
        common_fields = {
            "temperature": self.spec.temperature,
            "seed": self.spec.seed,
            "stream": request.stream,
            "id_slot": -1 if request.slot is None else request.slot % max(1, self.spec.n_parallel),
            "cache_prompt": self.spec.prefix_caching,
        }
        if request.ignore_eos:
            common_fields["ignore_eos"] = True
        if request.prompt_ids is not None:
            return "/completion", {"prompt": list(request.prompt_ids), "n_predict": request.max_tokens,
                                   **common_fields}
        payload = {"messages": request.messages, "max_tokens": request.max_tokens, **common_fields}
        if request.stream:
            payload["stream_options"] = {"include_usage": True}
        return "/v1/chat/completions", payload

    def measure(self, request: Request) -> Measurement:
        path, payload = self._payload(request)
        # chat responses without timings (older servers): the engine's prompt-token counter gives what it
        # evaluated; it is read AFTER each request (outside the timed region), and the value kept for the next
        # one, so nothing reaches the server between a settle pause and the timed request (except once, first)
        counted = self._counts_prompt_tokens()
        before = (self._counter if self._counter is not None else self._prompt_counter()) if counted else None
        self._counter = None  # until this request's own reading below
        try:
            r = self.client.exchange(path, payload, request.client)
        except HttpError as exc:
            refused = context_exceeded(exc)
            if refused is not None:
                refused.id_slot = self.served_slot(payload["id_slot"])
                raise refused from None
            raise self.request_failed(exc) from None
        except OSError as exc:
            raise self.request_failed(exc) from None
        fields = r.fields
        text = r.text
        if not request.stream:
            text = fields.get("content") if "content" in fields else \
                (fields.get("choices") or [{}])[0].get("message", {}).get("content") or ""
        timings = fields.get("timings") or {}
        usage = fields.get("usage") or {}
        cache_n = timings.get("cache_n")
        prompt_n = timings.get("prompt_n")
        prompt_tokens = usage.get("prompt_tokens")
        source = "timings.cache_n"
        if cache_n is None and prompt_n is not None and fields.get("tokens_evaluated") is not None:
            # older native /completion: no cache_n, but the prompt length and the evaluated part
            prompt_tokens = int(fields["tokens_evaluated"])
            cache_n, source = prompt_tokens - int(prompt_n), "tokens_evaluated - timings.prompt_n"
        if path != "/completion":
            self._chat_timings = bool(timings) if self._chat_timings is None else self._chat_timings
        if counted and self._counts_prompt_tokens():
            self._counter = self._prompt_counter()
            if not timings and before is not None and self._counter is not None and prompt_tokens is not None:
                prompt_n = int(round(self._counter - before))
                cache_n, source = int(prompt_tokens) - prompt_n, "usage.prompt_tokens - metrics prompt_tokens_total"
        if prompt_tokens is None and prompt_n is not None:
            prompt_tokens = prompt_n + (cache_n or 0)
        served = self.served_slot(payload["id_slot"])
        evaluated = None
        if request.prompt_ids is None and not self._apply_template:
            evaluated = self._evaluated_prompt(served, request.messages)
        return Measurement(
            ttft_s=r.ttft_s if request.stream else None,
            total_s=r.total_s,
            text=text or "",
            prompt_tokens=prompt_tokens,
            completion_tokens=usage.get("completion_tokens", timings.get("predicted_n")),
            cached_tokens=cache_n,
            engine_prompt_ms=timings.get("prompt_ms"),
            engine_predicted_ms=timings.get("predicted_ms"),
            connect_s=r.connect_s,
            send_s=r.send_s,
            first_byte_s=r.first_byte_s,
            id_slot=served,
            prompt_token_ids=evaluated,
            extra={"prompt_n": prompt_n, "endpoint": path, "cached_tokens_source": source},
        )

    def served_slot(self, requested: int) -> int:
        """The slot that served the last request: the requested one with a single slot, else read
        back from ``/slots`` (the newest ``id_task``), so a pin or the server's choice is verified."""
        if self.spec.n_parallel <= 1:
            return 0
        slots = self.slot_readout()
        used = [s for s in slots if s.get("id_task") is not None]
        if not used:
            raise EngineError(f"/slots names no slot that served a task (asked for slot {requested})", self.log_tail())
        return max(used, key=lambda s: s["id_task"])["id"]

    def slot_readout(self) -> list[dict]:
        """Per slot: id, context size, newest task id and the prompt tokens it holds (``/slots``)."""
        try:
            slots = self.client.get_json("/slots", timeout_s=10)
        except (HttpError, OSError) as exc:
            raise EngineError(f"llama-server /slots failed: {exc} (the server runs with --slots)", self.log_tail()) from None
        return [{"id": s.get("id"), "n_ctx": s.get("n_ctx"), "id_task": s.get("id_task"),
                 "n_tokens": s.get("n_prompt_tokens")} for s in slots]


    # -- raw-prompt completions (the prefix_reuse client) ----------------------
    def completion_request(self, prompt: str, max_tokens: int, slot: int | None = None) -> tuple[str, dict]:
        """Streaming ``/v1/completions`` for a raw prompt: any free slot, or slot ``slot % n_parallel``.

        Prefix caching is request-level here: ``cache_prompt`` from the spec
        (off = ``false``: the slot re-evaluates the whole prompt); the host-RAM
        cache is the separate ``--cache-ram`` knob (RuntimeSpec.cache_ram_mib).
        """
        payload = {
            "prompt": prompt, "max_tokens": max_tokens, "temperature": self.spec.temperature,
            "seed": self.spec.seed, "stream": True, "stream_options": {"include_usage": True},
            "cache_prompt": self.spec.prefix_caching, "ignore_eos": True,
        }
        if slot is not None:
            payload["id_slot"] = slot % max(1, self.spec.n_parallel)
        return "/v1/completions", payload

    @staticmethod
    def completion_counts(fields: dict) -> dict:
        """Token counts of a finished completion stream; cached = the engine's ``timings.cache_n``."""
        timings = fields.get("timings") or {}
        usage = fields.get("usage") or {}
        cache_n, prompt_n = timings.get("cache_n"), timings.get("prompt_n")
        prompt = usage.get("prompt_tokens")
        if prompt is None and prompt_n is not None:
            prompt = prompt_n + (cache_n or 0)
        return {"prompt_tokens": prompt, "completion_tokens": usage.get("completion_tokens", timings.get("predicted_n")),
                "cached_tokens": cache_n, "engine_prompt_ms": timings.get("prompt_ms"),
                "cached_tokens_source": "timings.cache_n"}

    def read_memory(self, client: HttpClient) -> dict:
        """KV-cache read-outs (``ServerBackend.memory_readout``): slots busy, cached tokens, KV buffer size."""
        out: dict = {}
        try:
            slots = client.get_json("/slots")
            out["slots"] = len(slots)
            out["slots_busy"] = sum(1 for s in slots if s.get("is_processing"))
            out["slot_n_ctx"] = slots[0].get("n_ctx") if slots else None
            for line in client.get_text("/metrics").splitlines():
                m = re.match(r"llamacpp:(prompt_tokens_cached_total|prompt_tokens_total|kv_cache_usage_ratio|"
                             r"kv_cache_tokens)\s+(\S+)", line)
                if m:
                    out[m.group(1)] = float(m.group(2))
        except (HttpError, OSError, ValueError):
            pass
        m = re.findall(r"llama_kv_cache:\s+size\s*=\s*([\d.]+)\s*MiB", self.log_path.read_text(errors="replace"))
        if m:
            out["kv_buffer_mib"] = float(m[-1])
        return out


def context_exceeded(exc: HttpError) -> ContextExceeded | None:
    """The server's refusal of a prompt longer than the slot's context, or None for any other error."""
    if exc.status != 400 or "exceed_context_size_error" not in exc.body:
        return None
    try:
        err = json.loads(exc.body).get("error") or {}
    except ValueError:
        err = {}
    return ContextExceeded(f"llama-server refused the prompt: {err.get('message') or exc.body[:200]}",
                           prompt_tokens=err.get("n_prompt_tokens"), n_ctx=err.get("n_ctx"))


def render_flash_attn(on: bool, help_text: str) -> list[str]:
    """``-fa on|off`` where the binary takes a value, else the old boolean ``-fa``."""
    if re.search(r"-fa,\s*--flash-attn\s*\[on\|off\|auto\]", help_text) or "--flash-attn [on|off" in help_text:
        return ["-fa", "on" if on else "off"]
    return ["-fa"] if on else []


def parse_cache_ram(log: str, requested: int, supported: bool) -> int | None:
    """The host-RAM prompt cache size the server reports (0 = disabled)."""
    if not supported:
        return 0  # builds without --cache-ram have no host-RAM prompt cache
    m = re.search(r"prompt cache is enabled, size limit:\s*(\S+)", log)
    if m:
        return -1 if m.group(1).lower().startswith("no") else int(re.sub(r"\D", "", m.group(1)) or -1)
    if re.search(r"prompt cache is disabled|cache_ram_mib\s*=\s*0|--cache-ram 0", log):
        return 0
    return None
