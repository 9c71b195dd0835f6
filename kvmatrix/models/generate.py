"""Generate a preset model deterministically: tokenizer, HF files, GGUF files.

Runs inside the "model" venv (torch, transformers, tokenizers, safetensors,
numpy), started by kvmatrix.models.store with the repo root on PYTHONPATH:

    python -m kvmatrix.models.generate --preset tiny --llama-source SRC --out DIR
    python -m kvmatrix.models.generate --from-hf HFDIR --llama-source SRC --out DIR

Same inputs give byte-identical files. Layout of --out: hf/ (config.json,
tokenizer files, model.safetensors), model-f16.gguf, model-q8_0.gguf,
manifest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from kvmatrix.models.gguf_meta import gguf_summary
from kvmatrix.models.presets import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PRESETS,
    SPECIAL_TOKENS,
    ModelPreset,
    param_count,
)

GENERATOR_VERSION = "1"
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
OUTTYPES = ("f16", "q8_0")
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[generate {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def corpus_texts() -> list[str]:
    """The training corpus, one string per file, in name order."""
    return [p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.glob("*.txt"))]


def training_texts() -> list[str]:
    """The corpus plus its word list in lower, Capitalized and UPPER case.

    The prose alone stops BPE at ~4.6k tokens; the case variants give the
    merges room to reach 8192, so no generated id is an unused [PAD] token
    (random weights emit every id they have).
    """
    texts = corpus_texts()
    words = sorted({w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)})
    return texts + [" ".join(f(w) for w in words) for f in (str.lower, str.capitalize, str.upper)]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- tokenizer ---------------------------------------------------------------

def train_tokenizer(vocab_size: int):
    """Byte-level BPE (GPT-2 regex) trained on the corpus; specials get ids 0..2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    return tok


def write_tokenizer(tok, hf: Path, preset: ModelPreset) -> dict[str, int]:
    """tokenizer.json plus the config files transformers and llama.cpp read."""
    # Round-trip through json with sorted keys so the bytes never depend on map order.
    write_json(hf / "tokenizer.json", json.loads(tok.to_str()))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": BOS_TOKEN, "unk_token": BOS_TOKEN}
    write_json(hf / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": preset.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in ids.items()
        },
    })
    write_json(hf / "special_tokens_map.json", specials)
    (hf / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return ids


# -- weights -----------------------------------------------------------------

def tensor_shapes(p: ModelPreset) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, in generation order."""
    h, f, kv = p.hidden_size, p.intermediate_size, p.num_kv_heads * p.head_dim
    shapes = [("model.embed_tokens.weight", (p.vocab_size, h))]
    for i in range(p.num_layers):
        pre = f"model.layers.{i}."
        shapes += [
            (pre + "input_layernorm.weight", (h,)),
            (pre + "self_attn.q_proj.weight", (h, h)),
            (pre + "self_attn.k_proj.weight", (kv, h)),
            (pre + "self_attn.v_proj.weight", (kv, h)),
            (pre + "self_attn.o_proj.weight", (h, h)),
            (pre + "post_attention_layernorm.weight", (h,)),
            (pre + "mlp.gate_proj.weight", (f, h)),
            (pre + "mlp.up_proj.weight", (f, h)),
            (pre + "mlp.down_proj.weight", (h, f)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (p.vocab_size, h))]


def write_weights(hf: Path, p: ModelPreset) -> None:
    """Normal(0, 0.02) weights (norms 1.0) from default_rng(seed), float16 safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(p.seed)
    tensors = {}
    for name, shape in tensor_shapes(p):
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float16)
        else:  # float32 draws, scaled and cast one tensor at a time (bounded RAM)
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float16)
    assert sum(t.size for t in tensors.values()) == param_count(p)
    save_file({k: tensors[k] for k in sorted(tensors)}, str(hf / "model.safetensors"), metadata={"format": "pt"})


def write_config(hf: Path, p: ModelPreset, ids: dict[str, int]) -> None:
    bos, eos = ids[BOS_TOKEN], ids[EOS_TOKEN]
    write_json(hf / "config.json", {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_position_embeddings,
        "rope_theta": p.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": p.vocab_size,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": bos,
        "torch_dtype": "float16",
        "dtype": "float16",
    })
    write_json(hf / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": bos})


# -- GGUF --------------------------------------------------------------------

def convert(hf: Path, out: Path, outtype: str, llama_source: Path, model_name: str) -> None:
    """Run llama.cpp's converter (through our wrapper) in a subprocess."""
    cmd = [sys.executable, "-m", "kvmatrix.models.convert", str(llama_source), str(hf),
           "--outfile", str(out), "--outtype", outtype, "--model-name", model_name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not out.is_file():
        print("\n".join(proc.stdout.splitlines()[-30:]), file=sys.stderr)
        raise SystemExit(f"convert_hf_to_gguf.py --outtype {outtype} failed (exit {proc.returncode})")


def check_gguf(path: Path, eos_id: int | None, template: str | None) -> dict:
    info = gguf_summary(path)
    if template is not None and info["chat_template"] != template:
        raise SystemExit(f"{path.name}: tokenizer.chat_template missing or different")
    if eos_id is not None and info["eos_token_id"] != eos_id:
        raise SystemExit(f"{path.name}: eos id {info['eos_token_id']} != {eos_id}")
    return info


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in ("tokenizers", "numpy", "safetensors", "torch", "transformers"):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "missing"
    return out


def read_commit(value: str) -> str:
    """--llama-commit is the commit itself or a file holding it."""
    path = Path(value)
    return path.read_text().strip() if value and path.is_file() else value


# -- main --------------------------------------------------------------------

def generate_preset(p: ModelPreset, out: Path) -> dict:
    """Write out/hf for preset ``p``; return manifest fields."""
    hf = out / "hf"
    hf.mkdir(parents=True)
    log(f"training tokenizer (target vocab {p.vocab_size})")
    tok = train_tokenizer(p.vocab_size)
    if tok.get_vocab_size() < p.vocab_size:
        log(f"tokenizer stopped at {tok.get_vocab_size()} tokens; ids up to {p.vocab_size} are [PAD] padding")
    ids = write_tokenizer(tok, hf, p)
    write_config(hf, p, ids)
    log(f"writing {param_count(p):,} float16 weights (seed {p.seed})")
    write_weights(hf, p)
    return {
        "kind": "preset", "name": p.name, "preset": p.as_dict(), "params": param_count(p),
        "vocab_size": p.vocab_size, "tokenizer_vocab_size": tok.get_vocab_size(),
        "special_tokens": ids, "bos_token_id": ids[BOS_TOKEN], "eos_token_id": ids[EOS_TOKEN],
        "chat_template": CHAT_TEMPLATE,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--from-hf", type=Path, help="convert an existing HF directory instead")
    ap.add_argument("--llama-source", type=Path, required=True)
    ap.add_argument("--llama-commit", default="unknown", help="commit, or a file holding it")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.preset:
        manifest = generate_preset(PRESETS[args.preset], out)
        hf, eos, template = out / "hf", manifest["eos_token_id"], CHAT_TEMPLATE
    else:
        hf = args.from_hf.resolve()
        manifest = {"kind": "hf", "name": hf.name, "source": str(hf)}
        eos = template = None
    model_name = f"kvmatrix-{manifest['name']}"
    for outtype in OUTTYPES:
        log(f"converting to GGUF {outtype}")
        path = out / f"model-{outtype}.gguf"
        convert(hf, path, outtype, args.llama_source.resolve(), model_name)
        info = check_gguf(path, eos, template)
    if args.preset and info["params"] != manifest["params"]:
        raise SystemExit(f"GGUF holds {info['params']} params, expected {manifest['params']}")
    if not args.preset:
        manifest.update(params=info["params"], eos_token_id=info["eos_token_id"],
                        bos_token_id=info["bos_token_id"], chat_template=info["chat_template"])
    files = [out / f"model-{t}.gguf" for t in OUTTYPES]
    if args.preset:
        files = sorted(p for p in hf.iterdir() if p.is_file()) + files
    manifest.update(
        generator_version=GENERATOR_VERSION,
        llama_cpp_commit=read_commit(args.llama_commit),
        libraries=library_versions(),
        files={p.relative_to(out).as_posix(): sha256(p) for p in files},
    )
    write_json(out / "manifest.json", manifest)
    log(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
