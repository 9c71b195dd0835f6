"""The embedded default models: presets (unit) and real generation (marked ``model``).

The generation tests use the default llama.cpp source (or $KVMATRIX_LLAMA_SOURCE);
they build the "model" venv once in the session's cache and then generate
``tiny`` into fresh temporary caches.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmatrix.models import store
from kvmatrix.models.gguf_meta import gguf_summary, read_gguf
from kvmatrix.models.presets import CHAT_TEMPLATE, PRESETS, SPECIAL_TOKENS, get_preset, param_count
from kvmatrix.plumbing.console import UserError

REPO = Path(__file__).resolve().parents[1]
needs_source = pytest.mark.usefixtures("llama_build")


# -- unit -------------------------------------------------------------------

def test_preset_param_counts():
    assert param_count(PRESETS["tiny"]) == 4_262_144
    assert param_count(PRESETS["gpt2-small"]) == 125_848_320
    assert param_count(PRESETS["llama-1b"]) == 1_266_780_160
    assert PRESETS["tiny"].head_dim == 64 and PRESETS["llama-1b"].head_dim == 128
    for p in PRESETS.values():
        assert p.hidden_size % p.num_heads == 0 and p.num_heads % p.num_kv_heads == 0
        assert p.max_position_embeddings == 4096


def test_unknown_preset_fails_with_one_line():
    with pytest.raises(UserError) as exc:
        get_preset("huge")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("unknown model preset 'huge'; use one of tiny, gpt2-small, llama-1b")


def test_ensure_model_rejects_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="unknown model preset 'nope'"):
        store.ensure_model("nope", tmp_path, "c")
    with pytest.raises(UserError, match="does not exist"):
        store.ensure_model(str(tmp_path / "missing.gguf"), tmp_path, "c")
    (tmp_path / "hf").mkdir()
    with pytest.raises(UserError, match="not an HF model directory"):
        store.ensure_model(str(tmp_path / "hf"), tmp_path, "c")
    with pytest.raises(UserError, match="no convert_hf_to_gguf.py"):
        store.ensure_model("tiny", tmp_path, "c")


def test_host_side_does_not_import_torch():
    code = "import sys, kvmatrix.models, kvmatrix.models.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_corpus_is_ascii_prose():
    files = sorted((REPO / "kvmatrix" / "models" / "corpus").glob("*.txt"))
    assert len(files) >= 8
    text = "".join(p.read_text(encoding="ascii") for p in files)
    assert 40_000 <= len(text) <= 80_000


# -- real generation ----------------------------------------------------------

@pytest.fixture(scope="module")
def model_py():
    """The model venv's python, made once in the session's cache."""
    return str(store.model_python())


@pytest.fixture(scope="module")
def tiny_pair(model_py, llama_build, tmp_path_factory):
    """``tiny`` generated twice, into two separate caches."""
    out = []
    for i in range(2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KVMATRIX_CACHE", str(tmp_path_factory.mktemp(f"cache{i}")))
            mp.setenv("KVMATRIX_MODEL_PYTHON", model_py)
            out.append(store.ensure_model("tiny", llama_build[0].path, "test-commit"))
    return out


def _run_py(python: str, code: str, *args: str) -> str:
    proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@needs_source
@pytest.mark.model
def test_tiny_is_byte_identical_across_caches(tiny_pair):
    a, b = tiny_pair
    assert a.gguf_f16.parent != b.gguf_f16.parent
    assert a.manifest == b.manifest
    names = set(a.manifest["files"])
    assert {"hf/model.safetensors", "hf/tokenizer.json", "model-f16.gguf", "model-q8_0.gguf"} <= names
    for name in [*names, "manifest.json"]:
        pa, pb = a.gguf_f16.parent / name, b.gguf_f16.parent / name
        assert pa.read_bytes() == pb.read_bytes(), name
    assert a.params == PRESETS["tiny"].params()
    assert a.manifest["tokenizer_vocab_size"] == a.manifest["vocab_size"] == 2048  # no [PAD] ids
    assert a.manifest["special_tokens"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert a.manifest["llama_cpp_commit"] == "test-commit"


@needs_source
@pytest.mark.model
def test_second_call_uses_cache(tiny_pair, model_py, llama_build, monkeypatch):
    a = tiny_pair[0]
    monkeypatch.setenv("KVMATRIX_CACHE", str(a.gguf_f16.parents[2]))
    monkeypatch.setenv("KVMATRIX_MODEL_PYTHON", model_py)
    monkeypatch.setattr(store, "_build", lambda *a, **k: pytest.fail("regenerated a cached model"))
    again = store.ensure_model("tiny", llama_build[0].path, "test-commit")
    assert again.gguf_f16 == a.gguf_f16 and again.hf_dir == a.hf_dir


@needs_source
@pytest.mark.model
def test_gguf_metadata(tiny_pair):
    files = tiny_pair[0]
    for path in (files.gguf_f16, files.gguf_q8_0):
        meta, tensors = read_gguf(path)
        assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
        assert meta["tokenizer.ggml.eos_token_id"] == SPECIAL_TOKENS.index("<|im_end|>")
        assert meta["tokenizer.ggml.bos_token_id"] == SPECIAL_TOKENS.index("<|endoftext|>")
        assert meta["tokenizer.ggml.pre"] == "gpt-2"
        assert meta["tokenizer.ggml.add_bos_token"] is False
        assert meta["tokenizer.ggml.tokens"][:3] == list(SPECIAL_TOKENS)
        assert meta["general.name"] == "kvmatrix-tiny"
        assert len(tensors) == 2 + 4 * 9 + 1
    assert gguf_summary(files.gguf_f16)["params"] == files.params
    as_is = store.ensure_model(str(files.gguf_q8_0), Path("/nonexistent"), "c")
    assert as_is.hf_dir is None and as_is.params == files.params and as_is.manifest["eos_token_id"] == 2


TOKENIZER_CHECK = r"""
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = [open(p).read() for p in sys.argv[2:]] + ["Caf\u00e9 \u00fcber \U0001F680  tabs\tand\n\nnewlines  "]
ok = all(tok.decode(tok.encode(t)) == t for t in texts)
msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
ids = tok.encode(text)
print(json.dumps({"ok": ok, "text": text, "ids": ids, "eos": tok.eos_token_id, "bos": tok.bos_token_id}))
"""


@needs_source
@pytest.mark.model
def test_tokenizer_round_trip_and_chat_template(tiny_pair, model_py):
    corpus = sorted(str(p) for p in (REPO / "kvmatrix" / "models" / "corpus").glob("*.txt"))[:3]
    res = json.loads(_run_py(model_py, TOKENIZER_CHECK, str(tiny_pair[0].hf_dir), *corpus))
    assert res["ok"]
    assert res["text"] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert res["ids"][0] == 1 and res["ids"].count(2) == 2  # specials encode as single ids
    assert (res["bos"], res["eos"]) == (0, 2)
    config = json.loads((tiny_pair[0].hf_dir / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["tie_word_embeddings"] is False
    assert (tiny_pair[0].hf_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE


PAD_HF = r"""
import json, sys
from pathlib import Path
import numpy as np
from safetensors.numpy import load_file, save_file
d, n = Path(sys.argv[1]), int(sys.argv[2])
t = load_file(str(d / "model.safetensors"))
for k in ("model.embed_tokens.weight", "lm_head.weight"):
    t[k] = np.concatenate([t[k], np.zeros((n - t[k].shape[0], t[k].shape[1]), t[k].dtype)])
save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
c = json.loads((d / "config.json").read_text()); c["vocab_size"] = n
(d / "config.json").write_text(json.dumps(c))
"""


@needs_source
@pytest.mark.model
def test_hf_dir_conversion_pads_vocab(tiny_pair, model_py, llama_build, tmp_path, monkeypatch):
    hf = tmp_path / "my-model"
    shutil.copytree(tiny_pair[0].hf_dir, hf)
    _run_py(model_py, PAD_HF, str(hf), "2304")
    monkeypatch.setenv("KVMATRIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KVMATRIX_MODEL_PYTHON", model_py)
    files = store.ensure_model(str(hf), llama_build[0].path, "test-commit")
    assert files.hf_dir == hf and files.manifest["kind"] == "hf"
    assert set(files.manifest["hf_files"]) >= {"config.json", "tokenizer.json", "model.safetensors"}
    meta, _ = read_gguf(files.gguf_f16)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 2304
    assert tokens[2048] == "[PAD2048]" and tokens[-1] == "[PAD2303]"
    assert set(types[2048:]) == {5}  # gguf TokenType.UNUSED
    assert files.params == PRESETS["tiny"].params() + 2 * 256 * 256
