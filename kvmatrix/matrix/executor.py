"""The executor: a ``Plan`` -> sources, model, per runtime the environments, each cell's spec, results.

One path for every command (run, matrix, prefix) and both runtimes: the llama.cpp sources and the model
once, then per runtime its provider (host: cached builds and venvs; docker: images), the engine host of each
family (``llama_host``, ``vllm_host``) preparing each source / release once and deriving each cell's
``CellSpec``, and ``host.run_cells``, the one cell loop.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path

from kvmatrix.matrix import allocation, containers, host, llamacpp, provision
from kvmatrix.matrix.external_host import ExternalHost
from kvmatrix.matrix.llama_host import LlamaHost
from kvmatrix.matrix.planner import Plan
from kvmatrix.matrix.vllm_host import VllmHost
from kvmatrix.plumbing.console import fail, say
from kvmatrix.runners.spec import CellSpec

#: catalogue family -> its engine host
ENGINE_HOSTS = {"llama": LlamaHost, "vllm": VllmHost}


def execute(args, plan: Plan) -> tuple[list[dict], int]:
    """Run every cell of ``plan``; (cell documents, engine starts)."""
    if plan.external:
        return _execute_external(args, plan)
    llama_keys = list(dict.fromkeys([pc.key for pc in plan.cells if pc.family == "llama"] or plan.llama_specs[:1]))
    sources = {k: llamacpp.ensure_source(k, plan.bindings_version) for k in llama_keys}
    converter = next(iter(sources.values()))  # the model's converter comes from the first llama.cpp source
    from kvmatrix.models.store import ensure_model  # noqa: PLC0415

    model = ensure_model(args.model, converter.path, converter.commit, getattr(args, "gguf_quant", None))
    quant = getattr(args, "quant", "f16")
    gguf = model.gguf_q8_0 if quant == "q8_0" else model.gguf_f16
    if gguf is None:
        fail(f"model {args.model} has no {quant} GGUF; use --quant f16")
    model_doc = {"name": model.name, "gguf": str(gguf), "quant": model.manifest.get("gguf_quant") or quant,
                 "params": model.params,
                 "sha256": (model.manifest.get("sha256") or {}).get(Path(gguf).name),
                 "hf_dir": str(model.hf_dir) if model.hf_dir else None}
    base_prov = {"host": host_facts(), "runner_git": runner_git(),
                 "model_manifest": {**{k: model.manifest.get(k) for k in ("preset", "generator_version", "llama_cpp_commit")},
                                    **({"hub": model.manifest["hub"]} if model.manifest.get("hub") else {})}}
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    docs: list[dict] = []
    starts = 0
    for kind in plan.runtimes():  # one runtime after another, each with its own provider
        ran = _run_runtime(args, plan, kind, sources, model, model_doc, base_prov)
        docs += ran.docs
        starts += ran.engine_starts
    return docs, starts


def _run_runtime(args, plan: Plan, kind: str, sources, model, model_doc: dict, base_prov: dict) -> host.CellRun:
    """Provision the environments of one runtime's cells, derive each cell's spec, run them."""
    provider, execute_cell, docker_client = provider_for(args, plan.run_name, kind)
    common_prov = {"runtime_kind": provider.kind, **base_prov}
    cells = [pc for pc in plan.cells if pc.runtime == kind]
    hosts = {family: cls(plan, sources) for family, cls in ENGINE_HOSTS.items()}
    for family, engine_host in hosts.items():  # environments, once per (family, source / release)
        for key in dict.fromkeys(pc.key for pc in cells if pc.family == family):
            engine_host.prepare(provider, key, [pc for pc in cells if pc.family == family and pc.key == key], model)
    run = []
    for pc in cells:
        runtime, engine, prov, launch = hosts[pc.family].cell(pc, common_prov)
        run.append((pc.cell, cell_spec(plan, pc, model_doc, runtime, engine, prov), launch))
    shard_note = f" (shard {plan.shard[0]}/{plan.shard[1]})" if plan.shard else ""
    what = f" ({plan.summary})" if plan.summary else ""
    say(f"{len(run)} cells{shard_note} -> {plan.out_dir} [{provider.kind} runtime]{what}")
    try:
        ran = host.run_cells(run, plan.out_dir, args.resume, execute_cell, reuse=args.engine_reuse)
    finally:
        if docker_client is not None:
            n = containers.remove_run_containers(docker_client, plan.run_name)
            if n:
                say(f"removed {n} container(s) of run {plan.run_name}")
    say(f"{provider.kind} runtime: {starts_text(ran.engine_starts)}")
    return ran


def _execute_external(args, plan: Plan) -> tuple[list[dict], int]:
    """Cells on an existing server: identified and read back first (refused in one line), then the one cell loop."""
    ext = ExternalHost(plan)
    with tempfile.TemporaryDirectory(prefix="kvmatrix-probe-") as probe_logs:  # nothing in --out before a refusal
        for url in dict.fromkeys(pc.key for pc in plan.cells):
            ext.prepare(url, [pc for pc in plan.cells if pc.key == url], Path(probe_logs))
    common_prov = {"host": host_facts(), "runner_git": runner_git()}
    run = []
    for pc in plan.cells:
        runtime, engine, prov, launch = ext.cell(pc, common_prov)
        run.append((pc.cell, cell_spec(plan, pc, ext.model_doc(pc.key), runtime, engine, prov), launch))
    say(f"{len(run)} cells -> {plan.out_dir} [existing server, not started by kvmatrix]")
    ran = host.run_cells(run, plan.out_dir, args.resume, None, reuse=args.engine_reuse)
    return ran.docs, ran.engine_starts


def cell_spec(plan: Plan, pc, model_doc: dict, runtime, engine: dict, provenance: dict) -> CellSpec:
    """The CellSpec of one planned cell, from what its engine host derived."""
    return CellSpec(cell_id=pc.cell.cell_id, run=plan.run_name, phase=pc.cell.phase, backend=pc.cell.backend,
                    model=model_doc, runtime=runtime, experiment=plan.experiment(pc.cell), out_dir=str(plan.out_dir),
                    engine=engine, provenance=provenance)


def provider_for(args, run_name: str, kind: str):
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


def starts_text(n: int) -> str:
    return f"{n} engine start{'s' if n != 1 else ''}"


def runner_git() -> dict:
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


def host_facts() -> dict:
    facts = {"hostname": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
             "platform": platform.platform()}
    sched = allocation.scheduler()
    return {**facts, "scheduler": sched} if sched else facts
