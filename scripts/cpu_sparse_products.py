"""The ``cpu_sparse`` backend's 2:4 products against dense ones, on the Linear layers of the
GPT and the ViT of ``fullsparse bench steps``.

    OMP_NUM_THREADS=2 python scripts/cpu_sparse_products.py --threads 2 \\
        --json docs/benchmarks/cpu-sparse-products.json

For each layer shape and role, the dense product a dense step runs (``F.linear``,
``dY · W``, ``dYᵀ · X``) against the 2:4 product of the same size (``spmm24`` on an operand
``pack24`` made; the weight gradient's dY is 2:4 along the tokens, as the MVUE leaves it),
interleaved, median over ``--repeats`` rounds. Then the MVUE of dY as ``fst_mvue`` runs it
on each backend: the dense MVUE then the dense product (``reference``), the MVUE packed in
one pass then the 2:4 product (``cpu_sparse``). Packing the weights is not timed (it is
part of the weight-side work ``bench steps`` reports).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fullsparse.bench.harness import interleaved_ms, machine_info
from fullsparse.kernels.cpu_sparse import mvue_packed, pack24, spmm24
from fullsparse.masks import mask_2to4
from fullsparse.operands import mvue_tokens

#: (model, tokens, d_in, d_out): the Linear layers of one block of each model
SHAPES = [
    ("gpt", 4096, 128, 384),
    ("gpt", 4096, 128, 128),
    ("gpt", 4096, 128, 512),
    ("gpt", 4096, 512, 128),
    ("vit", 2176, 192, 576),
    ("vit", 2176, 192, 192),
    ("vit", 2176, 192, 768),
    ("vit", 2176, 768, 192),
]


def _roles(tokens: int, d_in: int, d_out: int) -> dict[str, dict[str, Callable[[int], object]]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=gen)
    w = torch.randn(d_out, d_in, generator=gen)
    dy = torch.randn(tokens, d_out, generator=gen)
    w_k, w_co = w * mask_2to4(w, dim=1), w * mask_2to4(w, dim=0)
    dy_t = dy * mask_2to4(dy, dim=0)
    out_k, out_co = pack24(w_k), pack24(w_co.t())
    dw = torch.empty(d_out, d_in)
    key = (12345, 67890)

    def sparse_weight_grad(_: int) -> object:
        return spmm24(x.t(), pack24(dy_t.t()), out=dw.t())

    def mvue_sparse(_: int) -> object:
        packed = mvue_packed(dy, key)
        assert packed is not None
        return spmm24(x.t(), packed, out=dw.t())

    return {
        "output": {"dense": lambda _: F.linear(x, w_k), "sparse": lambda _: spmm24(x, out_k)},
        "grad_input": {
            "dense": lambda _: dy.matmul(w_co),
            "sparse": lambda _: spmm24(dy, out_co),
        },
        "grad_weight": {"dense": lambda _: dy_t.t().mm(x), "sparse": sparse_weight_grad},
        "mvue_grad_weight": {
            "dense": lambda _: mvue_tokens(dy).t().mm(x),
            "sparse": mvue_sparse,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | layer | role | dense ms | 2:4 ms | dense / 2:4 |")
    print("|---|---|---|---:|---:|---:|")
    for model, tokens, d_in, d_out in SHAPES:
        for role, fns in _roles(tokens, d_in, d_out).items():
            ms = interleaved_ms(fns, 2, args.repeats, torch.device("cpu"))
            row = {"model": model, "tokens": tokens, "d_in": d_in, "d_out": d_out, "role": role,
                   "dense_ms": ms["dense"], "sparse_ms": ms["sparse"],
                   "speedup": ms["dense"] / ms["sparse"]}  # fmt: skip
            rows.append(row)
            print(f"| {model} | {d_in}→{d_out} | {role} | {ms['dense']:.2f} | "
                  f"{ms['sparse']:.2f} | {row['speedup']:.2f}× |")  # fmt: skip
    for role in ("output", "grad_input", "grad_weight", "mvue_grad_weight"):
        for model in ("gpt", "vit"):
            sel = [r for r in rows if r["role"] == role and r["model"] == model]
            total = sum(r["dense_ms"] for r in sel) / sum(r["sparse_ms"] for r in sel)
            print(f"{model} {role}: the block's layers together {total:.2f}×")
    if args.json:
        result = {"machine": machine_info(), "threads": args.threads, "repeats": args.repeats,
                  "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
