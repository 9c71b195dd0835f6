"""llama-cpp-python in-process (phase 3b), two API paths:

* ``chat``:     ``Llama.create_chat_completion`` (the binding applies the GGUF's
                chat template itself);
* ``template``: the chat template rendered here from the GGUF's own template
                with jinja2, tokenized with ``Llama.tokenize`` and sent as
                tokens to ``create_completion``.

The bindings load ``libllama.so`` from ``LLAMA_CPP_LIB_PATH`` (the same build
as llama-server) — the host sets it. llama.cpp's own stderr output (context
creation, system info) is redirected at the file-descriptor level into the
engine log so the effective settings are read from the same lines as for
the server.

Engine-reported cache reuse: the binding decides how many prompt tokens it
keeps (``Llama.generate``'s prefix match) and evaluates the rest through
``Llama.eval``; the adapter wraps ``eval`` to record, per request, the tokens
it kept (``n_tokens`` at the first eval) and the prompt it evaluated.
``llama_perf_context`` gives llama.cpp's own prompt / generation times.
Never import torch or transformers in this process.
"""

from __future__ import annotations

import gc
import inspect
import os
import sys
import time
from pathlib import Path

from kvmatrix.runners.backends import llamacpp_common as common
from kvmatrix.runners.backends.base import Backend, EngineError, Measurement, Request
from kvmatrix.runners.engine_args import Rules, controlled

VARIANTS = ("chat", "template")

#: every ``Llama(...)`` keyword ``render`` sets -> what sets it instead; ``--engine-arg`` refuses them
BINDINGS_CONTROLLED = controlled((
    (("model_path",), "the model (the cell's GGUF)", "use --model (and --quant)"),
    (("n_ctx",), "n_ctx"),
    (("n_batch",), "n_batch"),
    (("n_ubatch",), "n_ubatch"),
    (("n_seq_max",), "n_parallel"),
    (("n_gpu_layers",), "n_gpu_layers"),
    (("type_k",), "cache_type_k"),
    (("type_v",), "cache_type_v"),
    (("n_threads",), "n_threads"),
    (("n_threads_batch",), "n_threads_batch"),
    (("seed",), "seed"),
    (("flash_attn",), "flash_attn"),
    (("verbose",), "the start-up log kvmatrix reads back (verbose=True)", "leave it out"),
))
#: --engine-arg as Llama(...) keywords: --use-mlock -> use_mlock=True (a name Llama() lacks fails the start)
ENGINE_ARGS = Rules("kwargs", controlled=BINDINGS_CONTROLLED)


class LlamaCppPython(Backend):
    name = "llamacpp_python"
    reference_client = "bare Llama call (same API and arguments), no kvmatrix code in the timed region"
    engine_args = ENGINE_ARGS

    def __init__(self, cell, log_dir: Path):
        super().__init__(cell, log_dir)
        self.variant = cell.engine.get("variant", "chat")
        if self.variant not in VARIANTS:
            raise EngineError(f"unknown llama-cpp-python variant {self.variant!r}; use one of {VARIANTS}")
        self.llm = None
        self._lib = None
        self._saved_stderr: int | None = None
        self._calls: list[dict] = []
        self._template = None
        self._eog: list[int] = []

    def render(self) -> dict:
        s = self.spec
        self.rendered = {"kwargs": {
            "model_path": self.cell.model["gguf"],
            "n_ctx": s.n_ctx, "n_batch": s.n_batch, "n_ubatch": s.n_ubatch,
            "n_gpu_layers": s.n_gpu_layers, "flash_attn": s.flash_attn,
            "n_threads": s.n_threads, "n_threads_batch": s.n_threads_batch,
            "seed": s.seed, "type_k": s.cache_type_k, "type_v": s.cache_type_v,
            "n_seq_max": s.n_parallel, "verbose": True,
            **self.split_engine_args()[1],
        }, "variant": self.variant, "LLAMA_CPP_LIB_PATH": os.environ.get("LLAMA_CPP_LIB_PATH"),
            **self.engine_args_record()}
        return self.rendered

    # -- start / stop ---------------------------------------------------------
    def start(self) -> None:
        self._redirect_stderr()
        t0 = time.monotonic()
        try:
            import llama_cpp  # noqa: PLC0415 - only in this engine's environment

            self._lib = llama_cpp
            kw = dict(self.rendered.get("kwargs") or self.render()["kwargs"])
            kw["type_k"] = _ggml_type(llama_cpp, kw.pop("type_k"))
            kw["type_v"] = _ggml_type(llama_cpp, kw.pop("type_v"))
            n_seq_max = kw.pop("n_seq_max")
            unknown_keywords(llama_cpp.Llama, self.split_engine_args()[1])
            self.llm = llama_cpp.Llama(**kw)
        except EngineError:
            self._restore_stderr()
            raise
        except Exception as exc:  # noqa: BLE001 - load failures become a failed cell
            self._restore_stderr()
            raise EngineError(f"llama-cpp-python could not load the model: {exc}", self.log_tail()) from None
        if n_seq_max != 1:
            raise EngineError("llama-cpp-python serves one sequence; request n_parallel=1")
        self.start_seconds = time.monotonic() - t0
        self._wrap_eval()
        self._eog = end_of_generation_tokens(llama_cpp, self.llm)
        sys.stderr.flush()

    def stop(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.eval = None  # break the wrapper's reference cycle
            if hasattr(llm, "close"):
                llm.close()  # frees context and model while llama.cpp still logs into the engine log
            del llm
            gc.collect()
        self._restore_stderr()

    def _redirect_stderr(self) -> None:
        """llama.cpp logs through the C stderr: send fd 2 to the engine log."""
        if self._saved_stderr is not None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stderr.flush()
        self._saved_stderr = os.dup(2)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)

    def _restore_stderr(self) -> None:
        if self._saved_stderr is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved_stderr, 2)
        os.close(self._saved_stderr)
        self._saved_stderr = None

    # -- read back ------------------------------------------------------------
    def effective(self) -> dict:
        lib, ctx = self._lib, self.llm._ctx.ctx
        sys.stderr.flush()
        eff = common.parse_context_log(self.log_path.read_text(errors="replace"))
        eff.update({
            "n_ctx": self.llm.n_ctx(),
            "n_batch": lib.llama_n_batch(ctx),
            "n_ubatch": lib.llama_n_ubatch(ctx),
            "n_parallel": lib.llama_n_seq_max(ctx),
            "n_threads": lib.llama_n_threads(ctx),
            "n_threads_batch": lib.llama_n_threads_batch(ctx),
            "gpu_offload_supported": bool(lib.llama_supports_gpu_offload()),
        })
        logged = eff.get("n_seq_max")
        if logged is not None and eff["n_parallel"] != logged:
            # llama.cpp b4094's llama_n_seq_max() returns the KV cache size (src/llama.cpp: kv_self.size);
            # the context's own start-up line is the value it runs with
            self.release_gaps["n_parallel"] = (
                f"llama_n_seq_max() of this libllama returns {eff['n_parallel']} (the KV cache size), not the "
                f"context's n_seq_max; read from the context log line instead (n_seq_max = {logged})")
            eff["n_parallel"] = logged
        if "n_gpu_layers" not in eff:
            eff["n_gpu_layers"] = 0 if not eff["gpu_offload_supported"] else None
        eff["chat_template_source"] = "gguf" if self._chat_template() else "none"
        eff["cache_ram_mib"] = 0  # the bindings keep no host-RAM prompt cache unless set_cache() is called; we never call it
        eff["prefix_caching"] = True  # Llama.generate always reuses the longest matching prefix; it cannot be switched off
        return {k: v for k, v in eff.items() if v is not None}

    def provenance(self) -> dict:
        lib = self._lib
        return {
            "engine": f"llama-cpp-python ({self.variant})",
            "llama_cpp_python_version": getattr(lib, "__version__", None),
            "system_info": lib.llama_print_system_info().decode(errors="replace").strip() if lib else None,
            "libllama": os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(lib.__file__).parent / "lib"),
            "gpu_offload_supported": bool(lib.llama_supports_gpu_offload()) if lib else None,
        }

    # -- tokens ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def _chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    def render_template(self, messages: list[dict]) -> str:
        if self._template is None:
            import jinja2  # noqa: PLC0415 - a dependency of llama-cpp-python

            source = self._chat_template()
            if not source:
                raise EngineError("the GGUF has no tokenizer.chat_template; use a model with a chat template")
            env = jinja2.Environment(loader=jinja2.BaseLoader(), autoescape=False)
            self._template = env.from_string(source)
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token="", eos_token="")

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        text = self.render_template(messages)
        return self.llm.tokenize(text.encode(), add_bos=self.llm._model.add_bos_token(), special=True)

    # -- measure --------------------------------------------------------------
    def _wrap_eval(self) -> None:
        original = self.llm.eval

        def eval_recording(tokens):
            self._calls.append({"kept": self.llm.n_tokens, "tokens": list(tokens)})
            return original(tokens)

        self.llm.eval = eval_recording

    def measure(self, request: Request) -> Measurement:
        """The variant's API call (or ``create_completion`` on ``request.prompt_ids``), timed from the call.

        ``client="reference"``: the same call with the same arguments and nothing kvmatrix-side
        inside the timed region: the first content chunk is taken, the rest drained after the clock.
        """
        llm, lib = self.llm, self._lib
        self._calls.clear()
        lib.llama_perf_context_reset(llm._ctx.ctx)
        kwargs = {"max_tokens": request.max_tokens, "temperature": self.spec.temperature,
                  "seed": self.spec.seed, "stream": request.stream}
        if request.ignore_eos:
            kwargs["logit_bias"] = {t: -1e9 for t in self._eog}
        if request.prompt_ids is not None:
            call, arg = llm.create_completion, lambda: {"prompt": list(request.prompt_ids)}
        elif self.variant == "chat":
            call, arg = llm.create_chat_completion, lambda: {"messages": request.messages}
        else:  # the template is rendered and tokenized inside the timed call, as a user of this path does
            call, arg = llm.create_completion, lambda: {"prompt": self.prompt_tokens(request.messages)}
        if request.client == "reference":
            ttft, total, text, usage = _bare_call(call, arg, kwargs)
        else:
            ttft, total, text, usage = _harness_call(call, arg, kwargs)
        perf = lib.llama_perf_context(llm._ctx.ctx)
        first = self._calls[0] if self._calls else {"kept": llm.n_tokens, "tokens": []}
        prompt_ids = list(llm.input_ids[: first["kept"]]) + first["tokens"]
        n_prompt = len(prompt_ids)
        generated = sum(len(c["tokens"]) for c in self._calls[1:]) + 1
        return Measurement(
            ttft_s=ttft,
            total_s=total,
            text=text,
            prompt_tokens=usage.get("prompt_tokens", n_prompt),
            completion_tokens=usage.get("completion_tokens", min(generated, request.max_tokens)),
            cached_tokens=first["kept"],
            engine_prompt_ms=perf.t_p_eval_ms,
            engine_predicted_ms=perf.t_eval_ms,
            prompt_token_ids=prompt_ids,
            extra={"n_p_eval": perf.n_p_eval, "n_eval": perf.n_eval,
                   "api": "create_completion(tokens)" if request.prompt_ids is not None else self.variant},
        )


def _chunk_text(chunk: dict) -> tuple[str, str | None]:
    choice = (chunk.get("choices") or [{}])[0]
    piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
    return piece or "", choice.get("finish_reason")


def _harness_call(call, arg, kwargs) -> tuple[float | None, float, str, dict]:
    """kvmatrix's measured path: TTFT at the first chunk with content (or the closing chunk)."""
    t0 = time.perf_counter()
    out = call(**arg(), **kwargs)
    ttft = None
    parts: list[str] = []
    usage: dict = {}
    if kwargs["stream"]:
        for chunk in out:
            piece, fin = _chunk_text(chunk)
            if ttft is None and (piece or fin):
                ttft = time.perf_counter() - t0
            parts.append(piece)
    else:
        choice = out["choices"][0]
        parts.append((choice.get("message") or {}).get("content") or choice.get("text") or "")
        usage = out.get("usage") or {}
    return ttft, time.perf_counter() - t0, "".join(parts), usage


def _bare_call(call, arg, kwargs) -> tuple[float | None, float, str, dict]:
    """The reference: the same call, the clock around the call and the first chunk only (the template
    variant's rendering stays inside, as in the harness: it is that API path's own cost)."""
    if not kwargs["stream"]:
        t0 = time.perf_counter()
        out = call(**arg(), **kwargs)
        total = time.perf_counter() - t0
        choice = out["choices"][0]
        return None, total, (choice.get("message") or {}).get("content") or choice.get("text") or "", \
            out.get("usage") or {}
    t0 = time.perf_counter()
    chunks = []
    ttft = None
    for chunk in call(**arg(), **kwargs):
        if ttft is None:
            piece, fin = _chunk_text(chunk)
            if piece or fin:
                ttft = time.perf_counter() - t0
        chunks.append(chunk)
    total = time.perf_counter() - t0
    return ttft, total, "".join(_chunk_text(c)[0] for c in chunks), {}


def end_of_generation_tokens(lib, llm) -> list[int]:
    """Every end-of-generation token id: ``llama_vocab_is_eog(vocab, t)`` in bindings on the vocab API
    (llama.cpp after early 2025), ``llama_token_is_eog(model, t)`` before (e.g. 0.3.2 on b4094)."""
    if hasattr(lib, "llama_vocab_is_eog"):
        vocab = llm._model.vocab
        return [t for t in range(llm.n_vocab()) if lib.llama_vocab_is_eog(vocab, t)]
    model = llm._model.model
    return [t for t in range(llm.n_vocab()) if lib.llama_token_is_eog(model, t)]


def unknown_keywords(llama_class, extra: dict) -> None:
    """Refuse engine arguments that are not ``Llama(...)`` keywords: its ``**kwargs`` would drop them silently."""
    params = inspect.signature(llama_class.__init__).parameters
    unknown = sorted(k for k in extra if k not in params or params[k].kind is inspect.Parameter.VAR_KEYWORD)
    if unknown:
        raise EngineError(f"--engine-arg: {', '.join(unknown)} is not a Llama() keyword of this llama-cpp-python "
                          "(it would be ignored); use its own names, such as use_mlock for llama-server's --mlock")


def _ggml_type(lib, name: str) -> int:
    value = getattr(lib, f"GGML_TYPE_{name.upper()}", None)
    if value is None:
        raise EngineError(f"KV cache type {name!r} is unknown to this llama-cpp-python")
    return value
