"""Run llama.cpp's convert_hf_to_gguf.py with our pre-tokenizer declared.

    python -m kvmatrix.models.convert LLAMA_SRC HF_DIR [converter options...]

The converter identifies a BPE tokenizer's pre-tokenizer by hashing how it
encodes a test string, and rejects hashes it does not know. Our tokenizer is
a freshly trained byte-level BPE with the plain GPT-2 regex, which is exactly
llama.cpp's "gpt-2" pre-tokenizer, so we declare that for any tokenizer.json
whose pre-tokenizer is a plain regex ByteLevel; all others go through the
converter's own detection unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def is_plain_byte_level(hf_dir: Path) -> bool:
    """True when tokenizer.json uses only ByteLevel(GPT-2 regex, no prefix space)."""
    try:
        tok = json.loads((Path(hf_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = tok.get("pre_tokenizer") or {}
    return (
        tok.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and (tok.get("model") or {}).get("type") == "BPE"
    )


def main(argv: list[str]) -> None:
    src, args = Path(argv[0]).resolve(), argv[1:]
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", src / "convert_hf_to_gguf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["convert_hf_to_gguf"] = module
    spec.loader.exec_module(module)
    try:  # newer trees keep the model classes in conversion/base.py
        from conversion.base import TextModel
    except ImportError:
        TextModel = getattr(module, "TextModel", None) or module.Model

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        if is_plain_byte_level(self.dir_model):
            return "gpt-2"
        return original(self, tokenizer)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", *args]
    module.main()


if __name__ == "__main__":
    main(sys.argv[1:])
