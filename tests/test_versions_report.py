"""The report's "Versions" section and fig8_versions, from synthetic cells of two engine releases."""

from __future__ import annotations

import struct

import pytest

from kvmatrix.analysis import versions
from kvmatrix.analysis.experiments import build_evidence
from kvmatrix.analysis.experiments.invalidation import build as build_rows
from kvmatrix.analysis.figures import WHEN_APPLICABLE, _draw
from kvmatrix.analysis.report import write_report
from tests.test_analysis import PNG_MAGIC, cell, section, table_header, table_rows, write_cells

OLD, NEW = ("0.3.2", "74d73dc"), ("0.3.36", "0c1e570")
CACHE = "/root/.cache/kvmatrix"
GAP_RAM = "this llama-server has no --cache-ram (no host-RAM prompt cache): requested 0 is what it does anyway"
GAP_SEQ = "llama-cpp-python 0.3.2 takes no n_seq_max; the slot count was read back from llama_n_seq_max"
TITLE = "Versions: engine releases compared"


def _ttfts(base: float) -> list[float]:
    """Five trials with median base + 1."""
    return [base, base + 1, base + 2, base + 1, base]


def llama_cell(release, backend, runtime, hit, miss, port):
    """An ok invalidation cell of one llama.cpp release as the matrix writes it (tagged id and label)."""
    bindings, commit = release
    old = release == OLD
    phase, variant = ("3a", None) if backend == "llamacpp_http" else ("3b", "chat")
    tag = f"{runtime}-llama_vendored-{bindings}"
    iface = backend + (f"/{variant}" if variant else "")
    doc = cell(phase, backend, 512, 256, _ttfts(hit), _ttfts(miss), label=f"{iface} @{tag}")
    doc["cell_id"] = f"{tag}-phase{phase}-{backend}{'-' + variant if variant else ''}-512x256"
    bindir = f"{CACHE}/builds/llama-{commit}-1234/bin" if runtime == "host" else "/opt/llama.cpp/build/bin"
    model = f"{CACHE}/models/tiny-5627d6a49f1497ac/model-f16.gguf"
    if backend == "llamacpp_http":
        argv = [f"{bindir}/llama-server", "-m", model, "--host", "127.0.0.1", "--port", str(port),
                "-c", "2048", "-b", "2048", "-ub", "512", "-np", "1", "--seed", "1234", "--metrics", "--slots"]
        argv += ["-fa"] if old else ["-fa", "off", "--cache-ram", "0", "--fit", "off"]
        argv += ["--jinja", "-lv", "4"]
        rendered = {"argv": argv}
        unverified, gaps = [], ({"cache_ram_mib": GAP_RAM} if old else {})
    else:
        kwargs = {"model_path": model, "n_ctx": 2048, "n_batch": 2048, "flash_attn": False, "type_k": "f16",
                  "verbose": True}
        if not old:
            kwargs["n_seq_max"] = 1
        rendered = {"kwargs": kwargs, "variant": variant, "LLAMA_CPP_LIB_PATH": bindir}
        unverified, gaps = ["seed", "temperature"], ({"n_seq_max": GAP_SEQ} if old else {})
    doc["runtime"].update(rendered=rendered, unverified=unverified, release_gaps=gaps)
    doc["provenance"].update(runtime_kind=runtime, llama_cpp_source=f"vendored:{bindings}", llama_cpp_commit=commit,
                             llama_cpp_python_version=bindings)
    return doc


def vllm_cell(version, hit, miss, port):
    old = version == "0.27.0"
    tag = f"host-vllm_{version}"
    doc = cell("1", "vllm_http", 512, 256, _ttfts(hit), _ttfts(miss), label=f"vllm_http @{tag}")
    doc["cell_id"] = f"{tag}-phase1-vllm_http-512x256"
    argv = [f"{CACHE}/venvs/vllm-{version}-abc/bin/python", "-m", "vllm.entrypoints.openai.api_server",
            "--model", f"{CACHE}/models/tiny/hf", "--served-model-name", "tiny", "--host", "127.0.0.1",
            "--port", str(port), "--max-model-len", "2048", "--block-size", "16", "--enable-prefix-caching"]
    env = {"VLLM_CACHE_ROOT": f"/tmp/kvmatrix-vllm-{port}/vllm-cache", "VLLM_NO_USAGE_STATS": "1",
           "HF_HUB_OFFLINE": "1"}
    if old:
        env["VLLM_USE_V1"] = "1"
    else:
        argv.append("--enable-prompt-tokens-details")
        env["VLLM_SERVER_DEV_MODE"] = "1"
    doc["runtime"].update(rendered={"argv": argv, "env": env, "vllm_version": version},
                          unverified=["flash_attn", "n_ubatch"])
    doc["runtime"]["effective"]["cached_tokens_source"] = ("metrics prefix-cache hits" if old
                                                          else "usage.prompt_tokens_details")
    doc["provenance"] = {"runtime_kind": "host", "vllm_version": version, "vllm_flag_table_row": "0.13-0.33"}
    return doc  # no runtime.release_gaps at all, as in files written before it existed


# hit / miss base TTFT (median = base + 1) per (release, interface, runtime)
LLAMA = {
    (OLD, "llamacpp_http", "host"): (10, 100), (OLD, "llamacpp_http", "docker"): (12, 104),
    (OLD, "llamacpp_python", "host"): (7, 90), (OLD, "llamacpp_python", "docker"): (8, 92),
    (NEW, "llamacpp_http", "host"): (20, 200), (NEW, "llamacpp_http", "docker"): (22, 204),
    (NEW, "llamacpp_python", "host"): (17, 190), (NEW, "llamacpp_python", "docker"): (18, 192),
}


def version_docs() -> list[dict]:
    docs = [llama_cell(rel, backend, rt, hit, miss, 50000 + i)
            for i, ((rel, backend, rt), (hit, miss)) in enumerate(LLAMA.items())]
    # the newer vLLM first on disk: the order comes from the version, not from the files
    return docs + [vllm_cell("0.32.0", 30, 300, 41000), vllm_cell("0.27.0", 40, 400, 42000)]


@pytest.fixture(scope="module")
def versions_text():
    return versions.section(build_rows(version_docs()))


@pytest.fixture(scope="module")
def versions_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("versions")
    out = tmp / "out"
    return out, write_report([write_cells(tmp / "run", version_docs())], out).read_text()


def _family(text: str, family: str) -> str:
    return text.split(f"### {family}: ", 1)[1].split("\n### ", 1)[0]


def _sub(text: str, title: str) -> str:
    return text.split(f"#### {title}\n", 1)[1].split("\n#### ", 1)[0]


def test_releases_come_from_provenance_in_version_order():
    docs = version_docs()
    rels = versions.releases(docs)
    assert {r.label for r in rels} == {"0.3.2 (74d73dc)", "0.3.36 (0c1e570)", "0.27.0", "0.32.0"}
    fams = versions.families(build_rows(docs))
    assert list(fams) == ["llama.cpp", "vLLM"]
    assert [r.label for r in dict.fromkeys(e.release for e in fams["vLLM"])] == ["0.27.0", "0.32.0"]
    assert {e.interface for e in fams["llama.cpp"]} == {"llamacpp_http", "llamacpp_python/chat"}


def test_ttft_table_rows_and_medians(versions_text):
    llama = _family(versions_text, "llama.cpp")
    assert llama.startswith("0.3.2 (74d73dc) → 0.3.36 (0c1e570)")
    ttft = _sub(llama, "TTFT per release")
    header = table_header(ttft)
    rows = [dict(zip(header, r, strict=True)) for r in table_rows(ttft)]
    assert [(r["Release"], r["Interface"], r["Runtime"]) for r in rows] == [
        (rel, iface, rt) for rel in ("0.3.2 (74d73dc)", "0.3.36 (0c1e570)")
        for iface in ("llamacpp_http", "llamacpp_python/chat") for rt in ("host", "docker")]
    for r in rows:
        rel = OLD if r["Release"].startswith("0.3.2 ") else NEW
        hit, miss = LLAMA[(rel, r["Interface"].split("/")[0], r["Runtime"])]
        assert r["Hit TTFT (ms) median [95% CI]"].startswith(f"{hit + 1:.2f} [")
        assert r["Miss TTFT (ms) median [95% CI]"].startswith(f"{miss + 1:.2f} [")
        assert r["Miss − hit (ms) [95% CI]"].startswith(f"+{miss - hit:.2f} [")
        assert r["Verified trials"] == "10/10" and r["A/B (tok)"] == "512/256"
    vllm = table_rows(_sub(_family(versions_text, "vLLM"), "TTFT per release"))
    assert [(r[0], r[4].split(" ")[0], r[5].split(" ")[0]) for r in vllm] == [
        ("0.27.0", "41.00", "401.00"), ("0.32.0", "31.00", "301.00")]


def test_flag_diff_lists_exactly_the_differing_settings(versions_text):
    llama = _sub(_family(versions_text, "llama.cpp"), "Flag diff")
    assert table_header(llama) == ["Interface", "Setting", "0.3.2 (74d73dc)", "0.3.36 (0c1e570)"]
    assert table_rows(llama) == [
        ["llamacpp_http", "`-fa`", "on", "off"],
        ["llamacpp_http", "`--cache-ram`", "—", "0"],
        ["llamacpp_http", "`--fit`", "—", "off"],
        ["llamacpp_python/chat", "`n_seq_max`", "—", "1"],
    ]
    vllm = _sub(_family(versions_text, "vLLM"), "Flag diff")
    assert {tuple(r) for r in table_rows(vllm)} == {
        ("vllm_http", "`--enable-prompt-tokens-details`", "—", "on"),
        ("vllm_http", "`env VLLM_USE_V1`", "1", "—"),
        ("vllm_http", "`env VLLM_SERVER_DEV_MODE`", "—", "1"),
    }
    tables = str(table_rows(llama) + table_rows(vllm))
    for volatile in ("--port", "--host", "`-m`", "--model", "--served-model-name", "model_path", "VLLM_CACHE_ROOT",
                     "llama-server", "/tmp/", ".cache", "LLAMA_CPP_LIB_PATH", "HF_HUB_OFFLINE"):
        assert volatile not in tables, volatile


def test_parse_argv_values_booleans_and_paths():
    got = versions.parse_argv(["/x/llama-server", "-m", "/m.gguf", "--seed", "-1", "--metrics", "-fa", "on",
                               "--foo=bar", "--port", "8080", "-lv", "4"])
    assert got == {"--seed": "-1", "--metrics": "on", "-fa": "on", "--foo": "bar", "-lv": "4"}


def test_gaps_list_unverified_release_gaps_and_cached_source(versions_text):
    llama = _sub(_family(versions_text, "llama.cpp"), "Could not read back / lacks")
    rows = {(r[0], r[1]): r for r in table_rows(llama)}
    assert rows[("0.3.2 (74d73dc)", "llamacpp_python/chat")][2:4] == ["host, docker", "seed, temperature"]
    assert rows[("0.3.36 (0c1e570)", "llamacpp_http")][3] == "none"
    assert f"- 0.3.2 (74d73dc), llamacpp_http: `cache_ram_mib`: {GAP_RAM}" in llama
    assert f"- 0.3.2 (74d73dc), llamacpp_python/chat: `n_seq_max`: {GAP_SEQ}" in llama
    vllm = _sub(_family(versions_text, "vLLM"), "Could not read back / lacks")
    assert [r[4] for r in table_rows(vllm)] == ["metrics prefix-cache hits", "usage.prompt_tokens_details"]
    assert "Release gaps: none recorded" in vllm


def test_report_embeds_the_figure_after_calibration(versions_report):
    out, text = versions_report
    assert text.index("## Harness overhead") < text.index(f"## {TITLE}") < text.index("\n## ", text.index(TITLE))
    body = section(text, TITLE)
    assert "](figures/fig8_versions.png)" in body and "](figures/fig8_versions.svg)" in body
    assert "fig8_versions.png" in section(text, "Appendix")  # the figure files
    png = (out / "figures" / "fig8_versions.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    width, height = struct.unpack(">II", png[16:24])
    assert width <= 2400 and height < width
    assert b"<svg" in (out / "figures" / "fig8_versions.svg").read_bytes()[:500]


def test_single_release_has_no_section_and_no_figure(tmp_path):
    docs = [d for d in version_docs() if "0.3.36" in d["cell_id"] or "0.32.0" in d["cell_id"]]
    ev = build_evidence(docs)
    assert versions.section(ev.rows, ["embedded"]) == ""
    assert versions.figure(ev.rows) is None
    stale = tmp_path / "figures" / "fig8_versions.png"
    stale.parent.mkdir()
    stale.write_bytes(PNG_MAGIC)
    assert [_draw(spec, ev, tmp_path / "figures") for spec in WHEN_APPLICABLE] == [None]  # no entry, not "skipped"
    assert not stale.exists()  # no stale figure from an earlier report


def test_findings_keep_releases_and_runtimes_apart():
    """The generated findings of a matrix of releases: one four-phase row per release and runtime, and
    server vs in-process paired within one release and runtime (never pooled across them)."""
    from kvmatrix.analysis import findings
    from kvmatrix.analysis.experiments import Evidence

    text = findings.section(version_docs()) + "\n".join(findings.appendix(Evidence(version_docs()), []))
    table = [line for line in text.splitlines() if line.startswith("| tiny | 512/256 |")]
    assert len(table) == 6  # 2 llama.cpp releases x 2 runtimes + 2 vLLM releases (host)
    old_docker = next(line for line in table if "`docker-llama_vendored-0.3.2`" in line)
    assert "13.0" in old_docker and "105.0" in old_docker  # llama-server 0.3.2 in Docker: hit 13, miss 105
    assert "not run" not in "".join(table)
    pairs = [line for line in text.splitlines() if "a hit through the server" in line]
    assert len(pairs) == 4 and all("pooled over 1 config " in line for line in pairs)
    assert any("llama.cpp `host-vendored-0.3.36`" in line for line in pairs)
