"""FSDP2 (fully_shard) with sparse layers: 2 gloo processes equal 1 process on the global
batch, masks come from the unsharded weights, and full state dicts save and resume.

The library tests start their workers with multiprocessing's spawn (no torchrun needed);
they write their results to files that the test then compares with a single-process run of
the same steps. The ``fullsparse train --fsdp`` tests run the CLI under torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fullsparse
from fullsparse.errors import ConfigError, UserError
from fullsparse.models import build_model
from fullsparse.nn import (
    load_sparse_state_,
    masked_grad_decay_,
    sparse_modules,
    sparse_state_dict,
)
from fullsparse.train import (
    TrainConfig,
    convert_checkpoint,
    evaluate_checkpoint,
    load_checkpoint,
    train,
)
from fullsparse.train.asp import keep_pruned_zero, prune_once_
from fullsparse.train.fsdp import full_state_dicts, load_full_state_dicts_, shard_model_

WORLD = 2
STEPS = 4  # SAVE_AT of them, a checkpoint, then the rest in a model resumed from it
SAVE_AT = 2


def _model(recipe: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("vit_tiny", 10, 3, 8, depth=2, embed_dim=32, num_heads=2)
    fullsparse.sparsify_(model, RECIPES[recipe])
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        for _ in range(STEPS)
    ]


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # momentum: state to save


def _asp(model: torch.nn.Module, opt: torch.optim.Optimizer, recipe: str, prune: bool) -> None:
    """Recipe asp: prune the (here: freshly initialised) weights once, then the hooks that
    keep the pruned ones zero (a resumed model gets its fixed masks from the sparse state)."""
    if recipe == "asp":
        if prune:
            prune_once_(model)
        keep_pruned_zero(model, opt)


def _single_process(recipe: str) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    model = _model(recipe)
    opt = _optimizer(model)
    _asp(model, opt, recipe, prune=True)
    losses = []
    for x, y in _batches():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        masked_grad_decay_(model)  # 2by4's decay where the config asks for it
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    masks = {n: m.tsm_mask for n, m in sparse_modules(model) if m.tsm_mask is not None}
    masks.update({f"{n}.fixed": m.fixed_mask for n, m in sparse_modules(model)
                  if m.fixed_mask is not None})  # fmt: skip
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, masks


def _sharded_steps(model, opt, batches, rank: int) -> list[float]:
    losses = []
    for x, y in batches:
        # each rank takes its half of the global batch; FSDP averages the gradients
        loss = F.cross_entropy(model(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank])
        loss.backward()
        masked_grad_decay_(model)  # on the sharded gradients and weights
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / WORLD)
    return losses


#: S_K / S_Co masks at every step; a cached transposable mask; 2by4's masked decay on the
#: sharded weights, with S_K of the weight (one pass) and with a cached S_K mask
RECIPES = {
    "fst": "fst",
    "tsm": "tsm",
    "fst-masked": fullsparse.recipe("fst", decay_kind="masked_grad", decay=1e-2),
    "fst-masked-cached": fullsparse.recipe(
        "fst", decay_kind="masked_grad", decay=1e-2, mask_interval=3
    ),
    "asp": "asp",  # pruned once, fixed masks kept through the steps and the resume
}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    try:
        for recipe in RECIPES:  # one pair of processes for all: starting them is the cost
            _run(rank, recipe, f"{out}.{recipe}")
        dist.barrier()  # no rank tears gloo down while another has work in flight
    finally:
        dist.destroy_process_group()


def _run(rank: int, recipe: str, out: str) -> None:
    """SAVE_AT sharded steps, a full-state checkpoint, then the remaining steps in a freshly
    built and sharded model that resumed from it."""
    batches = _batches()
    model = shard_model_(_model(recipe))
    opt = _optimizer(model)
    _asp(model, opt, recipe, prune=True)  # on the sharded weights
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
    _asp(model, opt, recipe, prune=False)
    rest = _sharded_steps(model, opt, batches[SAVE_AT:], rank)
    masks = {n: m.tsm_mask for n, m in sparse_modules(model) if m.tsm_mask is not None}
    masks.update({f"{n}.fixed": m.fixed_mask for n, m in sparse_modules(model)
                  if m.fixed_mask is not None})  # fmt: skip
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
    if recipe in ("tsm", "fst-masked-cached", "asp"):  # cached / fixed masks: one process's
        assert want_masks and masks[0].keys() == masks[1].keys() == want_masks.keys()
        for name, mask in want_masks.items():
            assert torch.equal(masks[0][name], mask) and torch.equal(masks[1][name], mask)
    else:
        assert masks == [{}, {}]


def test_shard_model_needs_a_process_group():
    with pytest.raises(UserError, match="torchrun"):
        shard_model_(_model("fst"))


# -- fullsparse train --fsdp ------------------------------------------------------------------

SRC = str(Path(fullsparse.__file__).resolve().parents[1])
VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}
RUN = dict(
    model="vit_tiny", model_kwargs=VIT, dataset="synthetic", synthetic_train=64,
    synthetic_test=33,  # odd: the ranks evaluate different numbers of test batches
    image_size=8, batch_size=16, epochs=2, lr=0.5, recipe="tsm", deterministic=True,
    progress=False, quiet=True, plot=False,
)  # fmt: skip


def _torchrun(*args: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "fullsparse", "train", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _cli_flags() -> list[str]:
    flags = []
    for key, value in RUN.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_fsdp_matches_one_process_and_resumes_with_or_without_fsdp(tmp_path):
    one = tmp_path / "one"
    train(TrainConfig(out=str(one), **RUN))
    two, three = tmp_path / "two", tmp_path / "three"
    # uninterrupted, with step checkpoints (gathered from the shards) inside each epoch
    _torchrun(*_cli_flags(), "--fsdp", "--checkpoint-every", "2", "--out", str(two))
    _torchrun(*_cli_flags(), "--fsdp", "--stop-after", "1", "--out", str(three))
    shutil.copytree(three, tmp_path / "single")
    _torchrun("--resume", "--out", str(three))  # the saved config carries --fsdp

    m1, m2, m3 = _metrics(one), _metrics(two), _metrics(three)
    assert len(m1) == len(m2) == len(m3) == 2 and m1[1]["train_loss"] != m1[0]["train_loss"]
    for a, b in zip(m1, m2, strict=True):  # FSDP on 2 processes = 1 process, global batch
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
        assert b["test_top1"] == pytest.approx(a["test_top1"])  # all 33 images counted once
        assert b["train_images"] == a["train_images"] == 64
    for b, c in zip(m2, m3, strict=True):  # resumed under FSDP = uninterrupted FSDP
        for key in ("train_loss", "test_loss", "train_acc", "test_top1"):
            assert c[key] == pytest.approx(b[key], rel=1e-6), key
    assert json.loads((three / "config.json").read_text())["fsdp"] is True

    want = load_checkpoint(one / "last.pt")
    for run in (two, three):
        got = load_checkpoint(run / "last.pt")
        assert list(got["model"]) == list(want["model"])  # the unsharded model's keys
        for key, value in want["model"].items():
            torch.testing.assert_close(got["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        masks = {k: v for k, v in got["sparse_state"].items() if "mask" in k}
        assert masks  # tsm caches its transposable masks: those of the unsharded weights
        for key, mask in masks.items():
            assert torch.equal(mask, want["sparse_state"][key]), key
        assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()

    # sharded: each rank wrote its shards; only the folders that last.pt and best.pt name stay
    for run in (two, three):
        raw = {f: torch.load(run / f, weights_only=True) for f in ("last.pt", "best.pt")}
        assert all(r["model"] == {} and r["optimizer"] == {} for r in raw.values())
        assert {f"shards/{p.name}" for p in (run / "shards").iterdir()} == {
            r["shards"] for r in raw.values()
        }
    # resumed under FSDP = uninterrupted, bit for bit: weights, optimizer and sparse state
    a, b = load_checkpoint(two / "last.pt"), load_checkpoint(three / "last.pt")
    for key in ("model", "sparse_state"):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), name
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(b["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    # eval reads the sharded checkpoint in place, and its one-file conversion gives the same
    convert_checkpoint(two / "best.pt", tmp_path / "best.pt")
    in_place, converted = (evaluate_checkpoint(p) for p in (two / "best.pt", tmp_path / "best.pt"))
    assert in_place.pop("checkpoint") != converted.pop("checkpoint")
    assert in_place == converted
    assert in_place["top1"] == pytest.approx(max(m["test_top1"] for m in m2))  # best epoch's

    # the FSDP checkpoint resumes in one process without --fsdp (the shards read whole)
    single = train(TrainConfig(out=str(tmp_path / "single"), resume=True, **RUN | {"fsdp": False}))
    assert single["epochs_done"] == 2
    raw = {
        f: torch.load(tmp_path / "single" / f, weights_only=True) for f in ("last.pt", "best.pt")
    }
    assert raw["last.pt"]["version"] == 1 and "shards" not in raw["last.pt"]
    # what stays of the FSDP epoch's shards is what best.pt still names (nothing, if epoch 2 won)
    left = {f"shards/{p.name}" for p in (tmp_path / "single" / "shards").iterdir()}
    assert left == {r["shards"] for r in raw.values() if "shards" in r}
    assert _metrics(tmp_path / "single")[1]["train_loss"] == pytest.approx(
        m1[1]["train_loss"], rel=1e-5
    )


def test_fsdp_refusals(tmp_path, capsys):
    with pytest.raises(UserError, match="--fsdp shards the model over processes.*torchrun"):
        train(TrainConfig(out=str(tmp_path / "r"), fsdp=True, **RUN))
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="fsdp and compile clash"):
        TrainConfig(fsdp=True, compile=True, **RUN)
    with pytest.raises(ConfigError, match="fsdp clash.*task='detection'"):
        TrainConfig(task="detection", fsdp=True)


@pytest.mark.slow
def test_fsdp_with_gradient_accumulation_equals_one_process(tmp_path):
    """2 FSDP processes, each running its 8 examples per step as 2 micro-batches: the
    weights and transposable masks of 1 process with the whole batch, the clocks at the
    optimizer steps (2 epochs of 4)."""
    train(TrainConfig(out=str(tmp_path / "one"), **RUN))
    _torchrun(*_cli_flags(), "--fsdp", "--grad-accum-steps", "2", "--out", str(tmp_path / "two"))
    want, got = (
        load_checkpoint(tmp_path / "one" / "last.pt"),
        load_checkpoint(tmp_path / "two" / "last.pt"),
    )
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in want["sparse_state"].items():
        assert torch.equal(got["sparse_state"][key], value), key
    clocks = {int(v) for k, v in got["sparse_state"].items() if k.endswith("tsm_step")}
    assert clocks == {8}


@pytest.mark.slow
def test_fsdp_asp_prunes_a_dense_run_like_one_process(tmp_path):
    """recipe asp under --fsdp: the dense run's weights load into the sharded model, the
    masks are those of the whole weights, and 2 processes train as 1."""
    dense = tmp_path / "dense"
    train(TrainConfig(out=str(dense), **RUN | {"recipe": "dense", "epochs": 1}))
    asp = RUN | {"recipe": "asp", "init_from": str(dense), "epochs": 1}
    train(TrainConfig(out=str(tmp_path / "one"), **asp))
    flags = [*_cli_flags(), "--recipe", "asp", "--init-from", str(dense), "--epochs", "1"]
    _torchrun(*flags, "--fsdp", "--out", str(tmp_path / "two"))
    want, got = (load_checkpoint(tmp_path / r / "last.pt") for r in ("one", "two"))
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    fixed = [k for k in want["sparse_state"] if k.endswith("fixed_mask")]
    assert fixed and all(
        torch.equal(got["sparse_state"][k], want["sparse_state"][k]) for k in fixed
    )
