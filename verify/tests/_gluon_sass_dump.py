"""The SASS of every Gluon key the committed FP8 config table routes a V4-Pro linear to (M = 128, 200, 4096, both
activation-scale modes), one file per key, addresses and encodings stripped: run it from two trees (each from its
repo root, each with a fresh TRITON_CACHE_DIR) and compare the directories to show a change leaves those keys'
code instruction for instruction as it was (kernels/sm90/NOTES_FP8.md, "Three accumulators").

    TRITON_CACHE_DIR=$(mktemp -d) python -m verify.tests._gluon_sass_dump OUTDIR
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    from kernels.sm90.gemm_fp8_block import CompileKey
    from verify.tests._sass import _cuobjdump
    from verify.tests.test_sm90_fp8_gluon_compile import V4_PRO_FP8_SHAPES, _compile

    if len(argv) != 1:
        print("usage: python -m verify.tests._gluon_sass_dump OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({key for m in (128, 200, 4096) for n, k in V4_PRO_FP8_SHAPES for ue8m0 in (True, False)
                   if (key := CompileKey.for_shape(m, n, k, act_scale_ue8m0=ue8m0)).gluon}, key=str)
    for i, key in enumerate(keys):
        with tempfile.TemporaryDirectory() as tmp:
            sass = _cuobjdump(_compile(key).asm["cubin"], Path(tmp), "-sass")
        lines = [re.sub(r"/\*[0-9a-f]{4,}\*/", "", line).strip() for line in sass.splitlines()]
        lines = [line for line in lines if line and not line.startswith("/* 0x")]
        (out / f"k{i:02d}.sass").write_text("\n".join(lines) + "\n")
        (out / f"k{i:02d}.key").write_text(f"{key.config()} groups={key.groups} chunk_blocks={key.chunk_blocks} "
                                           f"ue8m0={key.act_scale_ue8m0}\n")
        print(f"k{i:02d} {key.config()} {len(lines)} SASS lines", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
