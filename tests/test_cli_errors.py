"""Bad input: one line naming the problem and the fix, exit 2, nothing written or lost."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO, run_kvmatrix


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--config", "1500/600"], "context per slot is 2048"),
        (["--config", "512x256"], "malformed config '512x256'"),
        (["--config", "0/256"], "positive sizes"),
        (["--model", "no-such-preset"], "neither a preset"),
        (["--model", "/nonexistent/model.gguf"], "neither a preset"),
        (["--phases", "9"], "unknown phase '9'"),
        (["--trials", "0"], "at least 1 measured trial"),
        (["--n-ubatch", "4096"], "n_ubatch=4096 must be between 1 and n_batch=2048"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "phase3a-llamacpp_http-512x256.json"
    keep.write_text(json.dumps({"status": "ok"}))
    proc = run_kvmatrix("run", *args, "--out", str(out), timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc)
    assert line.startswith("kvmatrix: error: ") and needle in line, line
    assert len(proc.stderr.strip().splitlines()) == 1  # refused before any work
    assert json.loads(keep.read_text()) == {"status": "ok"}  # nothing already written is touched


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--llama", "b100"], "no llama-cpp-python release within 150 builds"),
        (["--llama", "b4000", "--bindings-version", "9.9.9"], "9.9.9"),
        (["--shard", "3/2"], "--shard '3/2'"),
        (["--vllm", "0.5.0"], "0.5.0"),
        (["--llama-build", "server,wheel"], "unknown llama build 'wheel'"),
    ],
)
def test_matrix_bad_input(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = run_kvmatrix("matrix", "--runtime", "host", *args, "--out", str(out), timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc)
    assert line.startswith("kvmatrix: error: ") and needle in line, line
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()  # refused before any work


def test_run_refuses_several_versions(tmp_path):
    proc = run_kvmatrix("run", "--llama-source", "vendored:0.3.36,b4000", "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 2 and "use `matrix`" in _last_line(proc)


# -- refused before any work: nothing downloaded, built, started or written -------------------------------------

#: Stops the run at the model check should the check under test be missing: the test then fails on its needle
#: instead of downloading a source or building llama.cpp.
BACKSTOP = ["--model", "/nonexistent/backstop.gguf"]


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("kvmatrix: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--threads", "0"], "--threads 0: give 1 or more CPU threads, or leave --threads out for all cores"),
        (["--threads", "-2"], "--threads -2: give 1 or more CPU threads"),
        (["--cache-ram", "-1"], "--cache-ram -1: give a size in MiB, 0 or more (0 = off"),
        (["--trials", "abc"], "--trials 'abc': not a whole number; give an integer (see `kvmatrix run --help`)"),
        (["--n-ctx", "ten"], "--n-ctx/--ctx-size/-c 'ten': not a whole number"),
        (["--llama-source", "/nonexistent"], "--llama-source /nonexistent: no such directory; pass a llama.cpp checkout"),
        (["--llama-source", "vendored:latest"], "expected a llama-cpp-python version such as vendored:"),
        (["--trials", "0"], "--trials 0: need at least 1 measured trial"),
        (["--warmup-trials", "-1"], "--warmup-trials -1: give 0 or more discarded warm-up trials"),
        (["--settle-ms", "-5"], "--settle-ms -5: give a pause of 0 ms or more"),
        (["--n-ctx", "0"], "--n-ctx 0: give a context of at least 16 tokens"),
        (["--n-batch", "0"], "--n-batch 0: give a batch of at least 1 token"),
        (["--max-output-tokens", "0"], "--max-output-tokens 0: give at least 1 token"),
        (["--config", "512"], "malformed config '512'; write A/B token sizes such as 512/256"),
        (["--phases", "9"], "unknown phase '9'; use one or more of 1, 2, 3a, 3b"),
        (["--cuda", "maybe"], "--cuda: invalid choice: 'maybe'"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option (see `kvmatrix run --help`)"),
    ],
)
def test_run_refuses_before_any_work(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = run_kvmatrix("run", *args, *BACKSTOP, "--out", str(out), timeout=120)
    line = _one_error_line(proc)
    assert needle in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    ("cmd", "args", "needle"),
    [
        ("matrix", ["--runtime", "host", "--llama", "vendored:0.3.36,/nonexistent"], "--llama /nonexistent: no such directory"),
        ("prefix", ["--llama-source", "/nonexistent"], "--llama-source /nonexistent: no such directory"),
        ("prefix", ["--threads", "0"], "--threads 0: give 1 or more CPU threads"),
        ("prefix", ["--n-ctx", "8"], "--n-ctx 8: give a context of at least 16 tokens"),
        ("build", ["--llama-source", "/nonexistent"], "--llama-source /nonexistent: no such directory"),
        ("model", ["--llama-source", str(REPO / "kvmatrix")], "not a llama.cpp checkout"),
    ],
)
def test_other_commands_refuse_before_any_work(tmp_path, cmd, args, needle):
    out = tmp_path / "out"
    proc = run_kvmatrix(cmd, *args, *(["--out", str(out)] if cmd in ("matrix", "prefix") else []), timeout=120)
    assert needle in _one_error_line(proc)
    assert not out.exists()


def test_no_command_is_one_line():
    assert "the following arguments are required: COMMAND" in _one_error_line(run_kvmatrix(timeout=60))


def _no_docker(tmp_path) -> dict:
    return {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}


def test_clean_without_docker_is_one_whole_line(tmp_path):
    line = _one_error_line(run_kvmatrix("clean", env=_no_docker(tmp_path), timeout=120))
    assert line == (f"kvmatrix: error: clean needs a Docker engine and none answers at unix://{tmp_path}/no-docker.sock "
                    "(no such socket); start dockerd or point DOCKER_HOST at a running engine")


def test_docker_runtime_without_docker_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    # backstop after the check: no cells (phase 3a without the server build) rather than fetching sources
    proc = run_kvmatrix("matrix", "--runtime", "docker", "--phases", "3a", "--llama-build", "shared",
                        "--out", str(out), env=_no_docker(tmp_path), timeout=120)
    line = _one_error_line(proc)
    assert "--runtime docker needs a Docker engine and none answers at" in line and "--runtime host" in line, line
    assert not out.exists()


# -- the analysis entry points ---------------------------------------------------------------------------------

def _module(name: str, *args: str, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", name, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_report_missing_folder_differs_from_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = _one_error_line(_module("kvmatrix.analysis.report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")))
    assert "missing: no such folder; pass an existing run folder" in missing, missing
    none = _one_error_line(_module("kvmatrix.analysis.report", str(empty), "--out", str(tmp_path / "o")))
    assert none.startswith(f"kvmatrix: error: no result cells in {empty}; run nox -s phase3a first"), none
    assert missing != none and not (tmp_path / "o").exists() and not (tmp_path / "missing").exists()
    usage = _one_error_line(_module("kvmatrix.analysis.report"))
    assert "required: DIR (see `python -m kvmatrix.analysis.report --help`)" in usage


def test_prefix_report_has_a_real_parser(tmp_path):
    proc = _module("kvmatrix.analysis.prefix_report", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m kvmatrix.analysis.prefix_report")
    assert "DIR" in proc.stdout and "--out" in proc.stdout and proc.stderr == ""
    assert list(tmp_path.iterdir()) == []  # no folder named --help
    missing = _one_error_line(_module("kvmatrix.analysis.prefix_report", "nope", cwd=tmp_path))
    assert "no prefix_reuse cells in nope: no such folder" in missing
    (tmp_path / "empty").mkdir()
    empty = _one_error_line(_module("kvmatrix.analysis.prefix_report", "empty", cwd=tmp_path))
    assert "no prefix_reuse cells in empty; run `kvmatrix prefix`" in empty
    assert "required: DIR" in _one_error_line(_module("kvmatrix.analysis.prefix_report", cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not list((tmp_path / "empty").iterdir())


# -- help, exit codes, the console script ----------------------------------------------------------------------

def _subcommands() -> dict:
    from kvmatrix.matrix import cli

    ap = cli.parser()
    return next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_of_every_command_has_help():
    top = run_kvmatrix("--help", timeout=60)
    assert top.returncode == 0, top.stderr
    for code in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {code}" in top.stdout.split("exit codes:")[1], top.stdout
    missing = []
    for name, sub in _subcommands().items():
        proc = run_kvmatrix(name, "--help", timeout=60)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: kvmatrix {name}"), proc.stderr
        for action in sub._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
            for option in action.option_strings:
                assert option in proc.stdout, (name, option)
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("name", ["run", "matrix", "prefix"])
def test_many_options_come_in_groups(name):
    sub = _subcommands()[name]
    titles = [g.title for g in sub._action_groups]
    assert {"experiment", "engine settings", "output"} <= set(titles), titles
    ungrouped = [a.dest for g in sub._action_groups if g.title in ("options", "optional arguments")
                 for a in g._group_actions if a.dest != "help"]
    assert not ungrouped, ungrouped


def test_console_script_is_the_module_entry(tmp_path):
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["kvmatrix"]
    module, func = target.split(":")
    code = f"import sys; sys.argv[0] = 'kvmatrix'; from {module} import {func}; {func}()"
    args = ["run", "--threads", "0", "--out", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    as_module = run_kvmatrix(*args, timeout=120)
    assert (script.returncode, script.stderr) == (as_module.returncode, as_module.stderr) == (2, as_module.stderr)
    assert _one_error_line(script).startswith("kvmatrix: error: --threads 0")


def test_interrupt_exits_130(tmp_path):
    # build, with the source step replaced by a wait: SIGINT arrives while "working"
    code = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from kvmatrix.matrix import cli, llamacpp\n"
            "def wait(*a, **k):\n    print('ready', file=sys.stderr, flush=True); time.sleep(60)\n"
            "llamacpp.ensure_source = wait\nsys.argv[0] = 'kvmatrix'\ncli.entry()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, "build"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and rest.strip().startswith("kvmatrix: interrupted"), rest
