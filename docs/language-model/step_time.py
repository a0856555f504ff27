"""Interleaved per-step timing of gpt_tiny training steps (batch 32 x 128) per recipe.

One AdamW step (forward, backward, clip, step) of dense, fst2 and fst in turn, the order
rotated each round, so background load on a shared machine hits all three alike; medians.

Usage: python docs/language-model/step_time.py THREADS ROUNDS > out.json
"""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fullsparse
from fullsparse.bench import machine_info
from fullsparse.models import gpt_tiny

threads = int(sys.argv[1])
rounds = int(sys.argv[2])
torch.set_num_threads(threads)
recipes = ("dense", "fst2", "fst")
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (32, 129), generator=g)
runs = {}
for r in recipes:
    torch.manual_seed(0)
    m = gpt_tiny()
    fullsparse.sparsify_(m, r)
    runs[r] = (m, torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95)))


def step(r):
    m, opt = runs[r]
    t = time.perf_counter()
    loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - t


for r in recipes:  # warm-up
    step(r)
    step(r)
times = {r: [] for r in recipes}
for i in range(rounds):
    order = recipes[i % 3 :] + recipes[: i % 3]  # rotate so no recipe always runs first
    for r in order:
        times[r].append(step(r))
med = {r: statistics.median(v) for r, v in times.items()}
out = {
    "what": "one AdamW training step of gpt_tiny (fwd+bwd+clip+step), batch 32 x 128 bytes",
    "threads": threads,
    "rounds": rounds,
    "machine": machine_info(),
    "median_seconds": med,
    "quartiles_seconds": {r: statistics.quantiles(v, n=4) for r, v in times.items()},
    "ratio_vs_dense": {r: med[r] / med["dense"] for r in recipes},
}
print(json.dumps(out, indent=1))
