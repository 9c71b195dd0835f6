"""Pure logic: spec validation, cache expectations, token-exact contexts (fake tokenizer allowed here)."""

from __future__ import annotations

import pytest

from kvmatrix.runners.results import Trial, condition_block, degradation_pct, describe, percentile
from kvmatrix.runners.spec import ABConfig, CellSpec, ExperimentSpec, RuntimeSpec, SpecError
from kvmatrix.runners.workload import Vocabulary, common_prefix, corpus_words, expected_cached, verify


def test_abconfig_parse():
    assert ABConfig.parse("512/256") == ABConfig(512, 256, 16)
    for bad in ("512", "a/b", "512/256/1", "-1/5"):
        with pytest.raises(SpecError):
            ABConfig.parse(bad)


def test_experiment_must_fit_context_per_slot():
    exp = ExperimentSpec(config=ABConfig(1000, 1000))
    exp.validate(RuntimeSpec(n_ctx=4096))
    with pytest.raises(SpecError, match="context per slot is 2048"):
        exp.validate(RuntimeSpec(n_ctx=4096, n_parallel=2))


def test_cellspec_roundtrip(tmp_path):
    cell = CellSpec(cell_id="c", run="r", phase="3a", backend="llamacpp_http", model={"gguf": "m"},
                    runtime=RuntimeSpec(n_threads=3, n_threads_batch=3), experiment=ExperimentSpec(),
                    out_dir=str(tmp_path))
    path = tmp_path / "c.json"
    path.write_text(cell.to_json())
    assert CellSpec.from_file(path) == cell


def test_runtime_rejects_unknown_settings():
    with pytest.raises(SpecError, match="unknown runtime setting"):
        RuntimeSpec.from_dict({"n_ctx": 2048, "n_bacth": 1})


def test_expected_cached_rules():
    held = [1, 2, 3, 4, 5, 6]
    assert expected_cached(held, [1, 2, 3, 9, 9]) == 3
    assert expected_cached(held, [1, 2, 3, 4, 5, 6]) == 5  # the last prompt token is always recomputed
    assert expected_cached(None, [1, 2]) == 0
    assert expected_cached(list(range(300)), list(range(290)) + [-1], granularity=128) == 256
    assert verify(256, 256, 128) and not verify(128, 256, 128) and not verify(None, 0)
    assert verify(3, 3) and not verify(2, 3)
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def fake_tokenize(text: str) -> list[int]:
    """A space-splitting tokenizer: each ' word' is one id unless the word is long (two ids)."""
    ids = []
    for w in text.split(" ")[1:]:
        ids += [hash(w) % 10_000] if len(w) <= 6 else [1, 2]
    return ids


def test_contexts_are_token_exact_and_distinct():
    vocab = Vocabulary.from_engine(fake_tokenize)
    ctx = vocab.contexts(50, 30, 7, seed=1)
    assert len(fake_tokenize(ctx.a)) == 50 and len(fake_tokenize(ctx.b)) == 30 and len(fake_tokenize(ctx.q)) == 7
    assert len(fake_tokenize(ctx.a + ctx.b + ctx.q)) == 87
    assert ctx.a.split()[0] != ctx.b.split()[0]
    assert vocab.contexts(50, 30, 7, seed=1) == ctx  # deterministic
    assert all(len(w) <= 6 for w in vocab.words)


def test_corpus_has_enough_words():
    assert len(corpus_words()) > 300


def test_stats():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    d = describe([1.0, 2.0, 3.0])
    assert d["n"] == 3 and d["median"] == 2.0 and d["stdev"] == 1.0


def _trial(i, ttft, warm=False, ok=True):
    return Trial(i, warm, ttft, ttft, 0.0, None, None, 10.0, 5.0, 1.0, 10, 5, 3, 3, 1, ok)


def test_condition_block_excludes_warmup_and_counts_verified():
    hit = condition_block([_trial(0, 100.0, warm=True), _trial(0, 10.0), _trial(1, 20.0, ok=False)])
    miss = condition_block([_trial(0, 30.0), _trial(1, 30.0)])
    assert hit["stats"]["ttft_ms"]["mean"] == 15.0 and hit["stats"]["n_trials"] == 2
    assert hit["stats"]["verified_trials"] == 1
    assert degradation_pct(hit, miss) == 100.0
