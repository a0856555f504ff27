"""FSDP2 (fully_shard) with sparse layers: 2 gloo processes equal 1 process on the global
batch, masks come from the unsharded weights, and full state dicts save and resume.

The workers are started with multiprocessing's spawn (no torchrun needed) and write their
results to files that the test then compares with a single-process run of the same steps.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fullsparse
from fullsparse.errors import UserError
from fullsparse.models import build_model
from fullsparse.nn import load_sparse_state_, sparse_modules, sparse_state_dict
from fullsparse.train.fsdp import full_state_dicts, load_full_state_dicts_, shard_model_

WORLD = 2
STEPS = 4  # SAVE_AT of them, a checkpoint, then the rest in a model resumed from it
SAVE_AT = 2


def _model(recipe: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("vit_tiny", 10, 3, 8, depth=2, embed_dim=32, num_heads=2)
    fullsparse.sparsify_(model, recipe)
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        for _ in range(STEPS)
    ]


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # momentum: state to save


def _single_process(recipe: str) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    model = _model(recipe)
    opt = _optimizer(model)
    losses = []
    for x, y in _batches():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    masks = {n: m.tsm_mask for n, m in sparse_modules(model) if m.tsm_mask is not None}
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, masks


def _sharded_steps(model, opt, batches, rank: int) -> list[float]:
    losses = []
    for x, y in batches:
        # each rank takes its half of the global batch; FSDP averages the gradients
        loss = F.cross_entropy(model(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank])
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / WORLD)
    return losses


RECIPES = ("fst", "tsm")  # S_K / S_Co masks at every step; a cached transposable mask


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    try:
        for recipe in RECIPES:  # one pair of processes for both: starting them is the cost
            _run(rank, recipe, f"{out}.{recipe}")
    finally:
        dist.destroy_process_group()


def _run(rank: int, recipe: str, out: str) -> None:
    """SAVE_AT sharded steps, a full-state checkpoint, then the remaining steps in a freshly
    built and sharded model that resumed from it."""
    batches = _batches()
    model = shard_model_(_model(recipe))
    opt = _optimizer(model)
    first = _sharded_steps(model, opt, batches[:SAVE_AT], rank)
    model_state, optim_state = full_state_dicts(model, opt)
    sparse_state = sparse_state_dict(model)
    if rank == 0:
        torch.save({"model": model_state, "optim": optim_state, "sparse": sparse_state},
                   f"{out}.ckpt")  # fmt: skip
    dist.barrier()
    saved = torch.load(f"{out}.ckpt", weights_only=True)
    model = shard_model_(_model(recipe))
    opt = _optimizer(model)
    load_full_state_dicts_(model, saved["model"], opt, saved["optim"])
    load_sparse_state_(model, saved["sparse"])
    rest = _sharded_steps(model, opt, batches[SAVE_AT:], rank)
    masks = {n: m.tsm_mask for n, m in sparse_modules(model) if m.tsm_mask is not None}
    every_rank: list = [None] * WORLD
    dist.all_gather_object(every_rank, masks)
    final, _ = full_state_dicts(model)
    if rank == 0:
        result = {"losses": first + rest, "final": final, "masks": every_rank,
                  "saved_keys": list(model_state)}  # fmt: skip
        torch.save(result, out)
    else:
        assert model_state == {} and final == {}  # one copy, on rank 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_and_resume_from_full_state(tmp_path):
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, start_method="spawn")
    for recipe in RECIPES:
        _check(recipe, torch.load(f"{out}.{recipe}", weights_only=True))


def _check(recipe: str, got: dict) -> None:
    want_losses, want_state, want_masks = _single_process(recipe)
    assert want_losses[-1] != want_losses[0]  # the steps moved the weights
    assert got["losses"] == pytest.approx(want_losses, rel=1e-5)  # resumed after SAVE_AT
    assert got["saved_keys"] == list(want_state)  # the keys of the unsharded model
    for key, value in want_state.items():
        torch.testing.assert_close(got["final"][key], value, rtol=1e-4, atol=1e-5)
    masks = got["masks"]
    if recipe == "tsm":  # cached masks: those of one process, on both ranks
        assert want_masks and masks[0].keys() == masks[1].keys() == want_masks.keys()
        for name, mask in want_masks.items():
            assert torch.equal(masks[0][name], mask) and torch.equal(masks[1][name], mask)
    else:
        assert masks == [{}, {}]


def test_shard_model_needs_a_process_group():
    with pytest.raises(UserError, match="torchrun"):
        shard_model_(_model("fst"))
