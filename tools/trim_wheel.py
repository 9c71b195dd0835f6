"""Rewrite a wheel without some of its files (RECORD updated), to carry a smaller one to an offline host.

Usage: python tools/trim_wheel.py IN.whl OUT_DIR PATH [PATH...]

Used for the H200 run: vLLM 0.26.0's FlashAttention-2 kernels (``vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so``,
124 MB compressed) and MoE kernels (``vllm/_moe_C_stable_libtorch.abi3.so``) are optional imports in vLLM
(``FA2_AVAILABLE`` / ``contextlib.suppress(ImportError)``); a dense model on Hopper runs FlashAttention-3.
The removed paths are written to OUT_DIR/<wheel>.trimmed.json for the provenance.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import zipfile
from pathlib import Path


def trim(src: Path, out_dir: Path, drop: set[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    removed = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in zin.infolist():
            if info.filename in drop:
                removed.append(info.filename)
                continue
            if info.filename == record_name:
                continue
            data = zin.read(info)
            zout.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{len(data)}")
        zout.writestr(record_name, "\n".join([*lines, f"{record_name},,"]) + "\n")
    missing = sorted(drop - set(removed))
    if missing:
        dst.unlink()
        raise SystemExit(f"trim_wheel: not in {src.name}: {', '.join(missing)}")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    (out_dir / f"{src.name}.trimmed.json").write_text(json.dumps(
        {"source_wheel": src.name, "source_sha256": sha, "removed": removed,
         "sha256": hashlib.sha256(dst.read_bytes()).hexdigest()}, indent=1) + "\n")
    return dst


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__.split("\n\n")[1])
    print(trim(Path(sys.argv[1]), Path(sys.argv[2]), set(sys.argv[3:])))
