"""Which shapes break PyTorch's CPU bfloat16 oneDNN convolutions, split by the two rules of
``fullsparse.kernels.reference.onednn_guard``: an output side of 1 ("out1"), a kernel tap
that only meets padding ("dead"), or neither ("other"). A wrong or crashed case under
"other" would be one the guard misses; such cases are printed as ``UNCOVERED``.

    OMP_NUM_THREADS=1 python scripts/onednn_dead_tap_scan.py SEED DRAWS   # e.g. 1 1500

Draws kernels 1-5, stride 1-3, padding 0-3, dilation 1-2, sizes 1-8 (wider than
onednn_scan.py, so that dead taps occur) and uses its forked-child runner. Run it from the
repository root.
"""

from __future__ import annotations

import random
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

from fullsparse.geometry import ConvGeometry
from fullsparse.kernels.reference import _has_dead_tap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onednn_scan as scan  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rng = random.Random(int(argv[0]))
    counts: Counter[tuple[str, str, str]] = Counter()
    for _ in range(int(argv[1])):
        kh, kw = rng.choice((1, 2, 3, 4, 5)), rng.choice((1, 2, 3, 4, 5))
        sh, sw = rng.choice((1, 2, 3)), rng.choice((1, 2, 3))
        ph, pw = rng.choice((0, 1, 2, 3)), rng.choice((0, 1, 2, 3))
        dh, dw = rng.choice((1, 2)), rng.choice((1, 2))
        h, w = rng.choice((1, 2, 3, 4, 6, 8)), rng.choice((1, 2, 3, 4, 6, 8))
        if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
            continue  # empty output
        batch, ci, co = rng.choice((1, 2)), rng.choice((1, 3, 8)), rng.choice((1, 4))
        case = (batch, ci, co, h, w, kh, kw, sh, sw, ph, pw, dh, dw)
        out = scan.output_size(case)
        geo = ConvGeometry.make((sh, sw), (ph, pw), (dh, dw))
        kind = (
            "out1"
            if min(out) == 1
            else ("dead" if _has_dead_tap((h, w), (kh, kw), geo, out) else "other")
        )
        for op in scan.OPS:
            result = scan.in_child(case, op)
            if isinstance(result, float):
                verdict = "right" if result < scan.TOLERANCE else "wrong"
            else:
                verdict = "crash" if result == "crash" else "error"
            counts[(op, kind, verdict)] += 1
            if verdict != "right" and kind == "other":
                print("UNCOVERED", op, case, result)
    for key in sorted(counts):
        print(key, counts[key])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
