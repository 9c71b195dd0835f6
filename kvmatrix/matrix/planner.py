"""The planner: parsed options -> a ``Plan`` (every cell, its experiment spec, the base runtime spec).

Pure: it reads the options and the catalogue, checks every value and every cell's derived spec, and
refuses bad input in one line (exit 2) BEFORE anything is downloaded, built, started or written. The
executor (``matrix/executor.py``) turns a plan into environments, cell specs and results.

Commands: ``run`` (one llama.cpp source, one vLLM release, one runtime), ``matrix`` (lists of
sources / releases / runtimes, shards) and ``prefix`` (the repeated-prefix benchmark: one cell per
server x prefix caching off / on) all produce the same ``Plan``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmatrix import catalog
from kvmatrix.matrix import allocation, containers, llamacpp
from kvmatrix.matrix import cells as cellmod
from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.plumbing.console import UserError, fail, say
from kvmatrix.runners import engine_args as eargs
from kvmatrix.runners.backends import get_backend
from kvmatrix.runners.spec import DEFAULT_CONFIGS, ABConfig, ExperimentSpec, RuntimeSpec, SpecError

#: --runtime values (matrix: a comma-separated axis of host and docker)
RUNTIMES = ("auto", "docker", "host")

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


@dataclass(frozen=True)
class PlannedCell:
    runtime: str  # the runtime kind it runs in: host, docker or auto
    family: str  # the catalogue family: which engine host provides it
    key: str  # the llama.cpp source spec or the vLLM release
    cell: cellmod.Cell


@dataclass
class Plan:
    command: str  # run, matrix, prefix
    cells: list[PlannedCell]
    runtime: RuntimeSpec  # the base runtime spec; ``cell_runtime`` derives each cell's
    experiments: dict[tuple[str, str], ExperimentSpec]  # (experiment, config label) -> spec
    engine_args: dict[str, list[str]]
    llama_specs: list[str]
    bindings_version: str | None
    run_name: str
    out_dir: Path
    shard: tuple[int, int] | None = None
    summary: str = ""  # what the plan runs, for the progress line
    notes: list[str] = field(default_factory=list)

    def experiment(self, cell: cellmod.Cell) -> ExperimentSpec:
        return self.experiments[(cell.experiment, cell.config.label)]

    @property
    def external(self) -> bool:
        """Every cell runs on an existing server (--base-url)."""
        return bool(self.cells) and all(pc.runtime == "external" for pc in self.cells)

    def runtimes(self) -> list[str]:
        return list(dict.fromkeys(pc.runtime for pc in self.cells))


def cell_runtime(cell: cellmod.Cell, base: RuntimeSpec, experiment: ExperimentSpec, *,
                 gpu_offload: bool = False) -> RuntimeSpec:
    """THE derivation of a cell's RuntimeSpec from the run's base spec (a vLLM release's base for vLLM cells).

    batch_sweep: n_batch under test, n_ubatch <= n_batch. slot_eviction: n_parallel slots sharing the same
    total n_ctx. prefix_reuse: prefix caching off / on by the cell; an interface with slots gets one slot per
    request in flight (the highest concurrency), each slot keeping --n-ctx (n_ctx x slots in all, --cache-ram 0).
    ``gpu_offload``: a CUDA llama.cpp build offloads every layer. Nothing else changes.
    """
    rt = base
    if cell.n_batch is not None:
        rt = replace(rt, n_batch=cell.n_batch, n_ubatch=min(rt.n_ubatch, cell.n_batch))
    if cell.n_parallel is not None:
        rt = cellmod.slot_runtime(rt, cell.n_parallel)
    if experiment.name == "prefix_reuse":
        rt = replace(rt, prefix_caching=cell.variant == "cache_on")
        if catalog.interface(cell.backend).has("slots"):
            slots = requests_in_flight(experiment)
            rt = replace(rt, n_ctx=rt.n_ctx * slots, n_parallel=slots)
    if gpu_offload:
        rt = replace(rt, n_gpu_layers=-1)
    return rt


def requests_in_flight(experiment: ExperimentSpec) -> int:
    """prefix_reuse: the most requests in flight at once (the slots / sequences an engine must serve together)."""
    return max(experiment.concurrency)


def base_runtime(args) -> RuntimeSpec:
    """The run's RuntimeSpec from the options (``prefix`` has only --n-ctx and --threads: the rest default)."""
    threads = args.threads or allocation.cpu_count()
    return RuntimeSpec(n_ctx=args.n_ctx, n_batch=getattr(args, "n_batch", 2048), n_ubatch=getattr(args, "n_ubatch", 512),
                       flash_attn=getattr(args, "flash_attn", "off") == "on", cache_ram_mib=getattr(args, "cache_ram", 0),
                       n_threads=threads, n_threads_batch=threads)


# ---------------------------------------------------------------- checks of single options

def check_numbers(args, table) -> None:
    """Each numeric option within its range (None: not given, the default applies), or one line naming the fix."""
    for option, attr, minimum, fix in table:
        value = getattr(args, attr)
        if value is not None and value < minimum:
            fail(f"{option} {value}: {fix}")


def check_llama_sources(specs: list[str], option: str) -> None:
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


def check_model_arg(model: str) -> None:
    from kvmatrix.models.presets import PRESETS  # noqa: PLC0415

    if model in PRESETS:
        return
    from kvmatrix.models import hub  # noqa: PLC0415

    if hub.parse_id(model) is not None:  # a Hugging Face id: refused now when offline and not in the cache
        if hub.offline():
            hub.resolve(model)
        return
    path = Path(model).expanduser()
    if not path.exists():
        fail(f"model {model!r} is neither a preset ({', '.join(PRESETS)}), a Hugging Face id (org/name[@revision]) "
             "nor an existing path; pass one of those or the path of an HF directory / .gguf file")


def parse_engine_args(values: list[str]) -> dict[str, list[str]]:
    """``--engine-arg`` -> {backend: [ARG, ...]}; one line when malformed or when it sets what kvmatrix controls."""
    try:
        return eargs.collect(values, lambda backend: get_backend(backend).engine_args)
    except SpecError as exc:
        raise UserError(str(exc)) from None


def parse_runtimes(text: str, matrix: bool, check_engine: bool = True) -> list[str]:
    runtimes = cellmod.parse_list(text, RUNTIMES, "runtime")
    if not runtimes:
        fail(f"--runtime {text!r}: use one of {', '.join(RUNTIMES)}")
    if len(runtimes) > 1 and not matrix:
        fail("run takes one runtime; use `matrix` (nox -s matrix) for --runtime host,docker")
    if len(runtimes) != len(set(runtimes)) or (len(runtimes) > 1 and "auto" in runtimes):
        fail(f"--runtime {text!r}: list each runtime once, host and/or docker (auto picks one)")
    if "docker" in runtimes and check_engine:  # refused now, not after the sources are fetched and the model generated
        down = containers.engine_down()
        if down:
            fail(f"--runtime {text} needs a Docker engine and {down}; start dockerd (or set DOCKER_HOST), "
                 "or use --runtime host")
    return runtimes


def _configs(args) -> list[ABConfig]:
    try:
        return [ABConfig.parse(c, args.query_tokens) for c in args.config] or [
            ABConfig(c.a, c.b, args.query_tokens) for c in DEFAULT_CONFIGS]
    except SpecError as exc:
        raise UserError(str(exc)) from None


def _validate(plan_cells: list[PlannedCell], runtime: RuntimeSpec, experiments: dict) -> None:
    """Every cell's derived spec, before building or running anything (vLLM cells again with their release's
    base spec, once the model is known: ``vllm_host``)."""
    try:
        runtime.validate()
        for pc in plan_cells:
            exp = experiments[(pc.cell.experiment, pc.cell.config.label)]
            rt = cell_runtime(pc.cell, runtime, exp)
            rt.validate()
            exp.validate(rt)
    except SpecError as exc:
        raise UserError(str(exc)) from None


def _out(args, default_prefix: str) -> tuple[str, Path]:
    run_name = args.run_name or dt.datetime.now().strftime(f"{default_prefix}-%Y%m%d-%H%M%S")
    return run_name, Path(args.out or Path("results") / run_name).resolve()


# ---------------------------------------------------------------- run / matrix

def plan_run(args) -> Plan:
    """``run`` (host, one source / release) and ``matrix`` (lists of both, docker or host, shards)."""
    matrix = args.cmd == "matrix"
    check_numbers(args, RUN_NUMBERS)
    if getattr(args, "base_url", None) or getattr(args, "engine", None):
        return plan_external(args)
    engine_args = parse_engine_args(args.engine_arg)
    phases = cellmod.parse_phases(args.phases or ("1,2,3a,3b" if matrix else "3a,3b"))
    configs = _configs(args)
    runtime = base_runtime(args)
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
    check_llama_sources(llama_specs, "--llama" if matrix else "--llama-source")
    experiments = _experiments(args, exp_names, configs)
    check_model_arg(args.model)
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
    runtimes = parse_runtimes(args.runtime, matrix, check_engine=not getattr(args, "emit", None))  # emit: on the nodes

    # -- the cells: runtime x (family, version) x phase x build x experiment x config; then this host's shard
    notes = []
    if matrix and "server" not in builds and any(
            "server" in i.builds for p in phases for i in catalog.phases()[p]):
        notes.append("the llama-server phases left out: --llama-build has no 'server'")
    cells: list[PlannedCell] = []
    for rt in runtimes:
        prefix = f"{rt}-" if len(runtimes) > 1 else ""
        keys = {"llama": llama_specs, "vllm": vllm_versions}
        for family in catalog.FAMILIES:
            fam_phases = [p for p in phases if catalog.phases()[p][0].family == family]
            for key in keys[family]:
                tag = (f"{prefix}llama_{cellmod.slug(key)}" if family == "llama" else f"{prefix}vllm_{key}") \
                    if matrix else None
                for p in fam_phases:
                    rows = catalog.phases()[p]
                    server_built = "server" in rows[0].builds
                    if server_built and matrix and "server" not in builds:
                        continue
                    variant_built = bool(set(rows[0].builds) - {"server"})
                    for c in cellmod.expand([p], configs, exp_names,
                                            (bindings_builds or ("shared",)) if variant_built else (),
                                            batch_sizes, parallel_slots):
                        if variant_built and (c.variant not in apis or not bindings_builds):
                            continue
                        cells.append(PlannedCell(rt, family, key, replace(c, tag=tag)))
    ids = [pc.cell.cell_id for pc in cells]
    if len(set(ids)) != len(ids):
        fail("the same source or version is given twice; list each once")
    chosen = {c.cell_id for c in cellmod.shard([pc.cell for pc in cells], which_shard)}
    cells = [pc for pc in cells if pc.cell.cell_id in chosen]
    if not cells:
        fail("no cells to run: check --phases, --llama-build and --bindings-api (and --shard)")
    if any(pc.family == "vllm" for pc in cells) and args.model.endswith(".gguf"):
        vllm_phases = ", ".join(dict.fromkeys(pc.cell.phase for pc in cells if pc.family == "vllm"))
        fail(f"phases {vllm_phases} run vLLM, which needs an HF model directory (config.json, tokenizer, chat "
             f"template), not the GGUF file {args.model}; use a preset or an HF directory")
    _validate(cells, runtime, experiments)
    run_name, out_dir = _out(args, "run")
    for note in notes:
        say(note)
    return Plan(args.cmd, cells, runtime, experiments, engine_args, llama_specs, bindings_version, run_name, out_dir,
                which_shard)


def _experiments(args, exp_names, configs) -> dict[tuple[str, str], ExperimentSpec]:
    try:
        scan_points = tuple(float(x) for x in args.scan_points.split(","))
    except ValueError:
        raise UserError(f"--scan-points {args.scan_points!r}: give fractions such as 0,0.25,0.5,0.75,1") from None
    return {(name, c.label): ExperimentSpec(name=name, config=c, num_trials=args.trials,
                                            warmup_trials=args.warmup_trials, settle_ms=args.settle_ms,
                                            max_output_tokens=args.max_output_tokens,
                                            scan_points=scan_points if name == "recompute_scan" else None,
                                            keep_warm=args.keep_warm, calibration=args.calibration)
            for name in exp_names for c in configs}


# ---------------------------------------------------------------- an existing server

#: --engine -> catalogue family
ENGINES = {"llamacpp": "llama", "vllm": "vllm"}
#: experiments whose axis changes how the server runs: only a server kvmatrix starts can take them
SERVER_SETTING_AXES = ("n_batch", "n_parallel")


def plan_external(args) -> Plan:
    """``run --base-url URL --engine vllm|llamacpp``: the server phases of that engine on a server kvmatrix did not
    start. Its settings are read back from its API before any cell (``external_host``); nothing is built."""
    url, engine = (args.base_url or "").rstrip("/"), args.engine
    if not url or not engine:
        fail("--base-url and --engine go together: --base-url http://HOST:PORT --engine vllm|llamacpp")
    if engine not in ENGINES:
        fail(f"--engine {engine!r}: use one of {', '.join(ENGINES)} (the API the server at --base-url speaks)")
    if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?", url):
        fail(f"--base-url {args.base_url!r}: give the server's root URL, such as http://127.0.0.1:8080")
    if args.engine_arg:
        fail(f"--engine-arg: the server at {url} was not started by kvmatrix; pass engine flags when you start it")
    family = ENGINES[engine]
    served = [p for p, rows in catalog.phases().items() if rows[0].family == family and rows[0].has("server")]
    phases = cellmod.parse_phases(args.phases) if args.phases else [p for p in served
                                                                    if catalog.phases()[p][0].has("chat")]
    wrong = [p for p in phases if p not in served]
    if wrong:
        fail(f"--phases {','.join(wrong)}: a {engine} server at --base-url serves phases {', '.join(served)}")
    exp_names = tuple(cellmod.parse_list(args.experiments, cellmod.EXPERIMENTS, "experiment"))
    for name in exp_names:
        if catalog.experiment(name).axis in SERVER_SETTING_AXES:
            fail(f"--experiments {name} changes {catalog.experiment(name).axis} between cells, which only a server "
                 "kvmatrix starts can do; use invalidation or recompute_scan with --base-url")
    configs = _configs(args)
    experiments = _experiments(args, exp_names, configs)
    cells = [PlannedCell("external", family, url, c) for p in phases for c in cellmod.expand([p], configs, exp_names)]
    if not cells:
        fail("no cells to run: check --phases and --experiments")
    run_name, out_dir = _out(args, "run")
    return Plan(args.cmd, cells, base_runtime(args), experiments, {}, [], None, run_name, out_dir,
                summary=f"existing {engine} server {url}")


# ---------------------------------------------------------------- prefix

def plan_prefix(args) -> Plan:
    """The repeated-prefix benchmark: per server one cell with prefix caching off and one with it on.

    llama-server: n_parallel = the highest concurrency (requests never queue for a slot), n_ctx = --n-ctx x
    n_parallel (each slot keeps its own --n-ctx window, non-unified KV), --cache-ram 0 in both modes; caching
    is the request's ``cache_prompt``. vLLM: max_model_len = --n-ctx, max_num_seqs = the highest concurrency,
    --enable/--no-enable-prefix-caching. Runs in the host or the docker runtime like any other cell.
    """
    from kvmatrix.runners import prompts as pr  # noqa: PLC0415

    check_numbers(args, PREFIX_NUMBERS)
    servers = catalog.phases_for("prefix_reuse")
    choices = tuple(sorted(i.backend for p in servers for i in catalog.phases()[p]))
    backends = cellmod.parse_list(args.backend, choices, "backend")
    if not backends:
        fail(f"--backend is empty; use {', '.join(choices)} (comma-separated)")
    conc = cellmod.parse_ints(args.concurrency, "--concurrency", "1,16", minimum=None)
    if min(conc) < 1:
        fail(f"--concurrency {args.concurrency}: every level must be >= 1 (requests in flight at once)")
    mixes = cellmod.parse_ints(args.reuse_mixes, "--reuse-mixes", "100,50,0", minimum=None)
    if any(not 0 <= m <= 100 for m in mixes):
        fail(f"--reuse-mixes {args.reuse_mixes}: give percentages between 0 and 100, such as 100,50,0")
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
    runtime = replace(base_runtime(args), n_parallel=1, cache_ram_mib=0)
    exp = ExperimentSpec(name="prefix_reuse", config=ABConfig(max(regimes), 16), num_trials=1, warmup_trials=0,
                         settle_ms=0, max_output_tokens=args.max_tokens, seed=args.seed,
                         prefix_regimes=tuple(regimes), variants=variants, concurrency=tuple(conc),
                         reuse_mixes=tuple(m / 100 for m in mixes), prompts_file=prompts_file)
    check_model_arg(args.model)
    llama_specs = [args.llama_source or llamacpp.DEFAULT_SOURCE]
    check_llama_sources(llama_specs, "--llama-source")
    runtimes = parse_runtimes(args.runtime, matrix=False)
    cells = []
    for backend in backends:
        iface = catalog.interface(backend)
        if iface.family == "vllm":
            vllmenv.check_version(args.vllm_version)
            if args.model.endswith(".gguf"):
                fail(f"{backend} needs an HF model directory, not the GGUF file {args.model}; use a preset, an HF "
                     "directory, or --backend llamacpp_http")
        key = args.vllm_version if iface.family == "vllm" else llama_specs[0]
        for caching in ("cache_off", "cache_on"):
            cells.append(PlannedCell(runtimes[0], iface.family, key,
                                     cellmod.Cell(iface.phase, backend, caching, exp.config, "prefix_reuse")))
    experiments = {("prefix_reuse", exp.config.label): exp}
    _validate(cells, runtime, experiments)
    run_name, out_dir = _out(args, "prefix")
    summary = (f"prefix regimes {','.join(map(str, regimes))}, {variants} questions, "
               f"concurrency {','.join(map(str, conc))}, reuse {','.join(map(str, mixes))}%")
    return Plan("prefix", cells, runtime, experiments, {}, llama_specs, None, run_name, out_dir, summary=summary)
