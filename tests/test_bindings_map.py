"""The llama.cpp tag -> llama-cpp-python release map: its data file and its lookups.

Expected values were checked against the sources named in the file's "derived" block
(release tags of abetlen/llama-cpp-python, llama.cpp commit counts and bNNNN tags).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvmatrix.matrix import bindings_map as bm
from kvmatrix.matrix.bindings_map import BindingsMapError, BindingsRelease

DATA = Path(bm.__file__).resolve().parent / "data" / bm.DATA_FILE


def _release(version: str, build: int | None, status: str = "published") -> BindingsRelease:
    return BindingsRelease(bindings_version=version, released=None, llama_cpp_commit="0" * 40,
                           llama_cpp_tag=None if build is None else f"b{build}", llama_cpp_build_number=build,
                           tag_relation=None if build is None else "exact", llama_cpp_commit_date=None,
                           pypi_status=status, source="test")


# --- the data file ---------------------------------------------------------------------------

def test_data_file_is_well_formed():
    document = json.loads(DATA.read_text())
    assert set(document) == {"derived", "releases"}
    derived = document["derived"]
    for key in ("generated", "bindings_repository", "llama_cpp_repositories", "method", "pypi"):
        assert derived[key], key
    assert re.fullmatch(r"[0-9a-f]{40}", derived["bindings_repository"]["head"])

    rows = document["releases"]
    versions = [r["bindings_version"] for r in rows]
    assert len(versions) == len(set(versions)), "duplicate bindings versions"
    keys = [tuple(int(p) for p in v.split(".")) for v in versions]
    assert keys == sorted(keys), "releases must be sorted by version"
    for row in rows:
        assert set(row) == set(BindingsRelease.__dataclass_fields__), row["bindings_version"]
        assert re.fullmatch(r"[0-9a-f]{40}", row["llama_cpp_commit"]), row
        for date in (row["released"], row["llama_cpp_commit_date"]):
            assert date is None or re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), row
        assert row["pypi_status"] in {"published", "yanked", "absent"}
        build, tag, relation = row["llama_cpp_build_number"], row["llama_cpp_tag"], row["tag_relation"]
        assert build is None or (isinstance(build, int) and build > 0), row
        if relation == "exact":
            assert tag == f"b{build}", row
        elif relation == "after":
            assert re.fullmatch(r"b\d+", tag) and int(tag[1:]) < build, row
        else:
            assert relation is None and tag is None, row


def test_build_numbers_never_go_backwards_across_releases():
    numbered = [r for r in bm.releases() if r.llama_cpp_build_number is not None]
    builds = [r.llama_cpp_build_number for r in numbered]
    assert builds == sorted(builds)


def test_coverage_includes_late_0_2_and_all_0_3():
    versions = {r.bindings_version for r in bm.releases()}
    assert {f"0.2.{n}" for n in range(60, 91)} <= versions
    assert {f"0.3.{n}" for n in range(0, 37)} <= versions


def test_releases_returns_a_fresh_list():
    first = bm.releases()
    first.clear()
    assert bm.releases()


# --- for_version -----------------------------------------------------------------------------

def test_for_version_returns_the_vendored_commit():
    release = bm.for_version("0.3.2")
    assert release.llama_cpp_commit == "74d73dc85cc2057446bf63cc37ff649ae7cebd80"
    assert (release.llama_cpp_tag, release.tag_relation, release.llama_cpp_build_number) == ("b4094", "exact", 4094)
    assert bm.for_version("v0.3.2") == release


def test_for_version_knows_0_3_36_without_a_build_number():
    release = bm.for_version("0.3.36")
    assert release.llama_cpp_commit.startswith("0c1e570")
    assert release.released == "2026-10-01"
    assert release.llama_cpp_build_number is None


@pytest.mark.parametrize("version", ["9.9.9", "0.3", "", "latest"])
def test_for_version_unknown_is_a_one_line_error(version):
    with pytest.raises(BindingsMapError) as info:
        bm.for_version(version)
    message = str(info.value)
    assert "\n" not in message and "--bindings-version" in message
    assert isinstance(info.value, ValueError)


# --- for_llama_tag on the real data ----------------------------------------------------------

def test_b4000_maps_to_0_3_2():
    # Neighbours: 0.3.1 vendors b3848 (152 builds before), 0.3.2 vendors b4094 (94 after).
    release = bm.for_llama_tag("b4000")
    assert release.bindings_version == "0.3.2"
    assert release.llama_cpp_build_number == 4094


@pytest.mark.parametrize(("tag", "version"), [("b4094", "0.3.2"), ("b10454", "0.3.35"), ("b9976", "0.3.34"),
                                              ("b3848", "0.3.1")])
def test_exact_build_maps_to_its_release(tag, version):
    assert bm.for_llama_tag(tag).bindings_version == version


def test_equal_distance_prefers_the_release_before_the_tag():
    # b3971 is 123 builds after 0.3.1 (b3848) and 123 before 0.3.2 (b4094).
    assert bm.for_llama_tag("b3971").bindings_version == "0.3.1"
    assert bm.for_llama_tag("b3972").bindings_version == "0.3.2"


def test_releases_sharing_a_build_resolve_to_the_newest():
    # 0.3.3 and 0.3.4 both vendor b4291; 0.3.10 and 0.3.11 both vendor b5763.
    assert bm.for_llama_tag("b4291").bindings_version == "0.3.4"
    assert bm.for_llama_tag("b5763").bindings_version == "0.3.11"


def test_releases_not_published_on_pypi_are_skipped():
    assert bm.for_version("0.2.21").pypi_status == "absent"  # vendors b1575, never uploaded
    assert bm.for_llama_tag("b1575").bindings_version == "0.2.20"  # b1573


def test_distance_limit_is_inclusive():
    assert bm.for_llama_tag("b10604").bindings_version == "0.3.35"  # 150 after b10454
    with pytest.raises(BindingsMapError):
        bm.for_llama_tag("b10605")
    assert bm.for_llama_tag("b10605", max_distance=151).bindings_version == "0.3.35"
    with pytest.raises(BindingsMapError):
        bm.for_llama_tag("b4000", max_distance=50)


def test_far_tag_is_refused_with_a_one_line_fix():
    with pytest.raises(BindingsMapError) as info:
        bm.for_llama_tag("b11312")
    message = str(info.value)
    assert "\n" not in message
    assert "b11312" in message and "nearest: 0.3.35 at b10454" in message
    assert "--bindings-version" in message and "between b10304 and b10604" in message
    assert "0.3.36" in message  # newer, but its build number is not recorded


def test_tag_before_every_release_is_refused():
    with pytest.raises(BindingsMapError, match=r"nearest: 0\.1\.31 at b309.*between b159 and b459"):
        bm.for_llama_tag("b100")


@pytest.mark.parametrize("tag", ["4000", "b", "B4000", "b40a0", "b4000 ", "master", "", "v0.3.2", "b-1"])
def test_malformed_tag_is_a_one_line_error(tag):
    with pytest.raises(BindingsMapError) as info:
        bm.for_llama_tag(tag)
    message = str(info.value)
    assert "\n" not in message and "bNNNN" in message and "--bindings-version" in message


def test_negative_max_distance_is_rejected():
    with pytest.raises(ValueError):
        bm.for_llama_tag("b4000", max_distance=-1)


# --- nearest() on synthetic tables -----------------------------------------------------------

def test_nearest_rules_on_a_synthetic_table():
    table = [_release("1.0.0", 100), _release("1.0.1", 100), _release("1.1.0", 200), _release("1.2.0", None)]
    assert bm.nearest(150, table).bindings_version == "1.0.1"  # tie: before wins; same build: newest
    assert bm.nearest(151, table).bindings_version == "1.1.0"
    assert bm.nearest(10_000, table).bindings_version == "1.1.0"  # unnumbered releases never win
    assert bm.nearest(5, [_release("2.0.0", None)]) is None
