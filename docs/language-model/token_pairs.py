"""How well does fst's token pairing fit a byte-level GPT? (writes token_pairs.json)

For every sparse Linear of a trained checkpoint, on the first validation windows:

* similarity of the paired inputs: mean cosine of X[2j] and X[2j+1] (the pair fst merges),
  against X[2j] and a random other token of the batch (what "no similarity" looks like);
* fidelity of the weight gradient: cosine and relative error of the fst ``grad_weight``
  (even tokens, dY[2j] + α·dY[2j+1], α = 1 and α = 0) against the exact dY·Xᵀ over all tokens.

Usage: python docs/language-model/token_pairs.py CHECKPOINT OUT.json [WINDOWS]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from fullsparse.bench import machine_info
from fullsparse.functional import linear_grad_weight
from fullsparse.nn import sparse_modules
from fullsparse.train import load_trained_model
from fullsparse.train.config import TrainConfig
from fullsparse.train.lm import build_corpus, validation_windows


def main(path: str, out: str, windows: int = 64) -> None:
    torch.manual_seed(0)
    model, state = load_trained_model(path)
    config = TrainConfig.from_dict({**state["config"], "resume": False, "force": False})
    val = validation_windows(build_corpus(config).val, int(model.context), windows)
    x, y = val[:, :-1], val[:, 1:]
    inputs, grads = {}, {}
    layers = dict(sparse_modules(model))
    hooks = []
    for name, module in layers.items():
        hooks.append(
            module.register_forward_hook(
                lambda m, a, o, n=name: inputs.__setitem__(n, a[0].detach())
            )
        )
        hooks.append(
            module.register_full_backward_hook(
                lambda m, gi, go, n=name: grads.__setitem__(n, go[0].detach())
            )
        )
    model.train()
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    for h in hooks:
        h.remove()
    rows = []
    for name in layers:
        a, g = inputs[name].double(), grads[name].double()  # (B, T, d_in), (B, T, d_out)
        even, odd = a[:, 0::2], a[:, 1::2]
        shuffled = odd.flatten(0, 1)[torch.randperm(odd.shape[0] * odd.shape[1])].view_as(odd)
        exact = linear_grad_weight(a, g, "dense")
        row = {
            "layer": name,
            "cos_pair": F.cosine_similarity(even, odd, dim=-1).mean().item(),
            "cos_random": F.cosine_similarity(even, shuffled, dim=-1).mean().item(),
        }
        for alpha in (1.0, 0.0):
            approx = linear_grad_weight(a, g, "ir", alpha)
            row[f"grad_weight_cos_alpha{alpha:g}"] = F.cosine_similarity(
                approx.flatten(), exact.flatten(), dim=0
            ).item()
            row[f"grad_weight_rel_err_alpha{alpha:g}"] = (
                (approx - exact).norm() / exact.norm()
            ).item()
        rows.append(row)
    result = {
        "checkpoint": path,
        "recipe": state["identity"]["recipe"],
        "epoch": int(state["epoch"]),
        "windows": windows,
        "machine": machine_info(),
        "rows": rows,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        print(
            f"{r['layer']:20s} cos pair {r['cos_pair']:.3f} random {r['cos_random']:.3f} | "
            f"grad_weight cos a=1 {r['grad_weight_cos_alpha1']:.3f} "
            f"a=0 {r['grad_weight_cos_alpha0']:.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
