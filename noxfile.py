"""kvmatrix sessions. Each is a few lines calling into kvmatrix.matrix / kvmatrix.analysis.

Options after ``--`` go to the underlying command, e.g.
``nox -s phase3a phase3b -- --trials 3 --out results/try``. The phase sessions run in
Docker when an engine answers (``--runtime auto``; ``-- --runtime host`` forces the host).
Builds, models and engine environments are cached under $KVMATRIX_CACHE
(default ~/.cache/kvmatrix), so only the first run is slow.
"""

import nox

nox.options.sessions = ["demo"]
nox.options.reuse_existing_virtualenvs = True


def _host(session, *args):
    """Install kvmatrix (host side, with the Docker SDK for ``--runtime docker``) and run ``python -m kvmatrix.matrix ...``."""
    session.install("-e", ".[docker]")
    session.run("python", "-m", "kvmatrix.matrix", *args)


@nox.session
def build(session):
    """Build llama.cpp (llama-server + libllama.so) and the bindings venv, cached."""
    _host(session, "build", *session.posargs)


@nox.session
def model(session):
    """Generate the default model: -- --preset tiny|gpt2-small|llama-1b (HF + GGUF, cached)."""
    _host(session, "model", *session.posargs)


@nox.session
def phase1(session):
    """Invalidation experiment on vLLM's OpenAI server (HTTP, chat completions)."""
    _host(session, "run", "--phases", "1", "--runtime", "auto", *session.posargs)


@nox.session
def phase2(session):
    """Invalidation experiment on vLLM in-process (LLM.generate with token ids)."""
    _host(session, "run", "--phases", "2", "--runtime", "auto", *session.posargs)


@nox.session
def phase3a(session):
    """Invalidation experiment on llama-server (HTTP, chat completions)."""
    _host(session, "run", "--phases", "3a", "--runtime", "auto", *session.posargs)


@nox.session
def phase3b(session):
    """Invalidation experiment on llama-cpp-python (chat API and manual template)."""
    _host(session, "run", "--phases", "3b", "--runtime", "auto", *session.posargs)


@nox.session
def phase1t(session):
    """Invalidation experiment on vLLM's OpenAI server, prompts as token ids (/v1/completions, no template)."""
    _host(session, "run", "--phases", "1t", "--runtime", "auto", *session.posargs)


@nox.session
def phase3t(session):
    """Invalidation experiment on llama-server, prompts as token ids (/completion, no template)."""
    _host(session, "run", "--phases", "3t", "--runtime", "auto", *session.posargs)


@nox.session
def matrix(session):
    """The matrix (engine versions x llama.cpp builds x phases x configs) in Docker, or on the host.

    -- --vllm 0.32.0,0.27.0 --llama b4000,vendored:0.3.36 --llama-build server,shared
    --phases 1,2,3a,3b --runtime auto|docker|host|host,docker --shard I/N --resume --out DIR.
    Tags download from GitHub or $KVMATRIX_LLAMA_ARCHIVE_URL (a {tag} template, file:// works).

    Default axes: what builds on this machine (vLLM CPU or GPU at the default release, llama.cpp from
    llama-cpp-python 0.3.36's vendored source, server + shared-library bindings, all four phases).
    """
    session.install("-e", ".[docker]")
    session.run("python", "-m", "kvmatrix.matrix", "matrix", *session.posargs)


@nox.session
def clean(session):
    """Docker: remove containers left by dead runs and superseded kvmatrix images (-- --images: all of them)."""
    _host(session, "clean", *session.posargs)


@nox.session
def report(session):
    """Write DIR/report.md and DIR/figures/ from result JSON: -- DIR [DIR ...]."""
    session.install("-e", ".[analysis]")
    session.run("python", "-m", "kvmatrix.analysis.report", *session.posargs)


@nox.session
def demo(session):
    """The embedded default end to end: build, tiny model, phases 1, 2, 3a, 3b, scan + sweep + slot eviction, report."""
    session.install("-e", ".[analysis]")
    args = list(session.posargs)
    out = args[args.index("--out") + 1] if "--out" in args else "results/demo"
    if "--out" not in args:
        args += ["--out", out]
    shared = [a for i, a in enumerate(args) if a in ("--out", "--model", "--llama-source")
              or (i and args[i - 1] in ("--out", "--model", "--llama-source"))]
    session.run("python", "-m", "kvmatrix.matrix", "run", "--phases", "1,2,3a,3b", "--run-name", "demo", *args)
    session.run("python", "-m", "kvmatrix.matrix", "run", "--phases", "3a,3b", "--bindings-api", "chat",
                "--experiments", "recompute_scan,batch_sweep", "--config", "256/128", "--trials", "3",
                "--batch-sizes", "64,256,2048", "--run-name", "demo", *shared)
    session.run("python", "-m", "kvmatrix.matrix", "run", "--phases", "3a", "--experiments", "slot_eviction",
                "--config", "256/128", "--n-ctx", "1024", "--n-batch", "1024", "--parallel-slots", "1,2,4",
                "--trials", "3", "--settle-ms", "100", "--run-name", "demo", *shared)
    session.run("python", "-m", "kvmatrix.analysis.report", out)
    session.log(f"report: {out}/report.md")


@nox.session
def prefix(session):
    """Repeated-prefix benchmark, prefix caching off vs on: llama-server + vLLM server (host runtime).

    -- --backend llamacpp_http,vllm_http --variants 20 --concurrency 1,16 --prefix-regimes medium,large
    --reuse-mixes 100,50,0 --prompts FILE --out DIR. Writes DIR/prefix_caching_results.md, the prompt
    set, per-request CSV/JSON and figures (~10-15 min on 2 CPU cores with the tiny model).
    """
    session.install("-e", ".[analysis]")
    session.run("python", "-m", "kvmatrix.matrix", "prefix", *session.posargs)


@nox.session
def calibrate(session):
    """Harness-overhead benchmark: phases 1, 2, 3a, 3b at 512/256, then the overhead and breakdown tables.

    Every cell carries the calibration control (harness vs reference client on the same requests);
    this session prints its tables. -- options go to ``run`` (e.g. --phases 3a,3b --trials 5 --out DIR).
    """
    session.install("-e", ".[analysis]")
    args = list(session.posargs)
    out = args[args.index("--out") + 1] if "--out" in args else "results/calibrate"
    if "--out" not in args:
        args += ["--out", out]
    if "--phases" not in args:
        args += ["--phases", "1,2,3a,3b"]
    if "--config" not in args:
        args += ["--config", "512/256"]
    session.run("python", "-m", "kvmatrix.matrix", "run", "--run-name", "calibrate", "--runtime", "host", *args)
    session.run("python", "-m", "kvmatrix.analysis.calibration", out)


@nox.session
def peer_check(session):
    """Benchmark: kvmatrix's TTFT vs ``vllm bench serve``, same server and prompts, 1 in flight (goal: within 5%).

    -- --engine vllm,llamacpp --prompts 24 --prefix-tokens 384 --max-tokens 16 --passes 2 --out DIR.
    Resolves the cached vLLM venv, model and llama.cpp build as the other sessions do, then runs
    benchmarks/peer_check.py inside the vLLM venv; prints a table per engine, writes DIR/peer_check.json.
    """
    session.install("-e", ".")
    session.run("python", "-m", "benchmarks.peer_check", *session.posargs)


@nox.session
def figures(session):
    """Regenerate figures from existing results without rerunning anything: -- DIR [DIR ...]."""
    session.install("-e", ".[analysis]")
    session.run("python", "-m", "kvmatrix.analysis.figures", *session.posargs)


@nox.session
def tests(session):
    """Unit tests and real-engine integration tests (pytest; -- passes pytest options)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *(session.posargs or ["-q"]))


@nox.session
def lint(session):
    """ruff over the project."""
    session.install("ruff")
    session.run("ruff", "check", "kvmatrix", "tests", "noxfile.py")


@nox.session
def compare(session):
    """Compare two runs cell by cell and gate: -- BASE NEW [--out DIR] [--fail-if "miss_ttft_ms>+10%" ...].

    Sides of several folders: -- --base DIR... --new DIR...; exit 1 when a gate holds (see --help).
    """
    session.install("-e", ".[analysis]")
    session.run("python", "-m", "kvmatrix.analysis.compare", *session.posargs)
