"""Read the metadata and tensor table of a GGUF file (stdlib only)."""

from __future__ import annotations

import math
import struct
from pathlib import Path

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f):
        self.f = f

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF file")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        return self.f.read(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            return [self.value(itype) for _ in range(count)]
        return self.unpack(_SCALARS[vtype])


def read_gguf(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...], int]]]:
    """Return (key/value metadata, [(tensor name, shape, ggml type)])."""
    with open(path, "rb") as f:
        r = _Reader(f)
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = r.unpack("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.unpack("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = tuple(r.unpack("<Q") for _ in range(r.unpack("<I")))
            ggml_type = r.unpack("<I")
            r.unpack("<Q")  # data offset
            tensors.append((name, dims, ggml_type))
    return meta, tensors


def gguf_summary(path: Path) -> dict:
    """The facts the benchmarks need from a GGUF: arch, params, tokens, template."""
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture", "")
    return {
        "architecture": arch,
        "name": meta.get("general.name"),
        "params": sum(math.prod(shape) for _, shape, _ in tensors),
        "context_length": meta.get(f"{arch}.context_length"),
        "vocab_size": len(meta.get("tokenizer.ggml.tokens", [])),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
