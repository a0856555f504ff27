"""Sharded checkpoints (``--fsdp``): every rank writes its own shards with
torch.distributed.checkpoint; they reload bit-exactly on 2 or 3 processes and whole in one;
a missing, damaged or hostile shards folder is refused in one line; ``fullsparse convert``
writes one file. The ``fullsparse train --fsdp`` run itself: ``test_fsdp.py``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from fullsparse.cli import main
from fullsparse.errors import CheckpointError, UserError
from fullsparse.train import (
    TrainConfig,
    convert_checkpoint,
    load_checkpoint,
    load_trained_model,
    train,
)
from fullsparse.train.checkpoint import save_checkpoint
from fullsparse.train.fsdp import (
    checkpoint_states,
    load_sharded_states_,
    save_sharded_states,
    shard_model_,
)
from fullsparse.train.sharded_checkpoint import read_full_states, shards_folder
from test_fsdp import RUN, SAVE_AT, _batches, _free_port, _model, _sharded_steps


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # AdamW: two moments and a step count per parameter (the CLI test covers SGD's momentum)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _init(rank: int, world: int, port: int) -> None:
    """Join the gloo group. A worker that got to its end meets the others at a barrier
    before it destroys the group: gloo can abort a process ("terminate called without an
    active exception") when one rank tears down while another still has work in flight
    (as :func:`fullsparse.train.distributed.shutdown_distributed` does)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip


def _save_worker(rank: int, port: int, run: str) -> None:
    """2 processes: SAVE_AT steps, the shards, the gathered states (the reference), then the
    shards loaded into a freshly built model (its initial weights: a load that does nothing
    fails the comparison)."""
    _init(rank, 2, port)
    try:
        model = shard_model_(_model("tsm"))
        opt = _optimizer(model)
        _sharded_steps(model, opt, _batches()[:SAVE_AT], rank)
        name = save_sharded_states(model, opt, run)
        want = checkpoint_states(model, opt)
        model = shard_model_(_model("tsm"))
        opt = _optimizer(model)
        load_sharded_states_(model, opt, Path(run) / name, "last.pt")
        got = checkpoint_states(model, opt)
        with torch.no_grad():  # one NaN, in rank 1's shard only
            weight = dict(model.named_parameters())["blocks.0.attn.qkv.weight"]
            weight.to_local().view(-1)[0] = float("nan") if rank == 1 else 0.0
        nan = save_sharded_states(model, opt, run)
        if rank == 0:
            torch.save({"name": name, "nan": nan, "want": want, "got": got}, f"{run}/two.pt")
        dist.barrier()  # see _init
    finally:
        dist.destroy_process_group()


def _load_worker(rank: int, port: int, run: str, name: str, nan: str) -> None:
    """3 processes load what 2 wrote (DCP reshards; 32 columns do not split evenly in 3),
    then refuse the states with a NaN weight."""
    _init(rank, 3, port)
    try:
        model = shard_model_(_model("tsm"))
        opt = _optimizer(model)
        load_sharded_states_(model, opt, Path(run) / name, "last.pt")
        got = checkpoint_states(model, opt)
        try:
            load_sharded_states_(model, opt, Path(run) / nan, "last.pt")
            refused = ""
        except CheckpointError as exc:
            refused = str(exc)
        if rank == 0:
            torch.save({"got": got, "refused": refused}, f"{run}/three.pt")
        dist.barrier()  # see _init
    finally:
        dist.destroy_process_group()


def _assert_equal(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    (model, optim), (want_model, want_optim) = got, want
    assert model.keys() == want_model.keys()
    for key, value in want_model.items():
        assert torch.equal(model[key], value), key
    assert optim["param_groups"] == want_optim["param_groups"]
    assert optim["state"].keys() == want_optim["state"].keys() and want_optim["state"]
    for i, state in want_optim["state"].items():
        assert optim["state"][i].keys() == state.keys() and state, i
        for key, value in state.items():
            assert torch.equal(optim["state"][i][key], value), (i, key)


def test_shards_reload_bit_exactly_on_two_and_three_processes_and_whole_in_one(tmp_path):
    run = str(tmp_path)
    mp.start_processes(_save_worker, args=(_free_port(), run), nprocs=2, start_method="spawn")
    saved = torch.load(tmp_path / "two.pt", weights_only=True)
    name, want = saved["name"], saved["want"]
    initial = _model("tsm").state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in want[0].items())  # steps moved it
    _assert_equal(saved["got"], want)  # same number of processes

    # each rank wrote its own half of every sharded weight: no rank held the whole model
    folder = shards_folder(tmp_path / "last.pt", {"shards": name})
    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    files = {}
    for index, info in meta.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    weight = "model.blocks.0.attn.qkv.weight"
    assert len(meta.state_dict_metadata[weight].chunks) == 2
    assert files[weight] == {"__0_0.distcp", "__1_0.distcp"}

    args = (_free_port(), run, name, saved["nan"])
    mp.start_processes(_load_worker, args=args, nprocs=3, start_method="spawn")
    three = torch.load(tmp_path / "three.pt", weights_only=True)
    _assert_equal(three["got"], want)
    # rank 0 (rows 0-31 of 96) refuses the NaN of row 48, in rank 1's shard
    assert "a weight (in another process's shard) holds NaN/Inf" in three["refused"]
    # one process, no process group: the single-file format's states
    _assert_equal(read_full_states(tmp_path / "last.pt", {"shards": name}), want)


# -- a sharded checkpoint made in one process, for the refusals and the conversion ---------


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    train(TrainConfig(out=str(out), **RUN | {"epochs": 1}))
    return out / "last.pt"


def _shard(single: Path, run: Path) -> Path:
    """``single`` as a sharded checkpoint in folder ``run`` (written by one process)."""
    state = load_checkpoint(single)
    optim = state["optimizer"]
    by_name = {
        "state": {f"p{i}": value for i, value in optim["state"].items()},
        "param_groups": [
            {**g, "params": [f"p{i}" for i in g["params"]]} for g in optim["param_groups"]
        ],
    }
    name = "shards/00aa11bb22cc33dd"
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(
            {"model": state["model"], "optimizer": by_name},
            storage_writer=dcp.FileSystemWriter(str(run / name)),
        )
    rest = {k: v for k, v in state.items() if k not in ("format", "version")}
    save_checkpoint(run / "last.pt", {**rest, "model": {}, "optimizer": {}, "shards": name})
    return run / "last.pt"


def test_a_sharded_checkpoint_reads_as_its_single_file_and_converts_to_one(single, tmp_path):
    sharded = _shard(single, tmp_path / "run")
    raw = torch.load(sharded, weights_only=True)
    assert raw["version"] == 2 and raw["model"] == {} and raw["shards"].startswith("shards/")
    want = load_checkpoint(single)
    for got in (load_checkpoint(sharded), load_checkpoint(_converted(sharded, tmp_path))):
        assert "shards" not in got
        _assert_equal((got["model"], got["optimizer"]), (want["model"], want["optimizer"]))
        assert got["sparse_state"].keys() == want["sparse_state"].keys()
    assert torch.load(tmp_path / "one.pt", weights_only=True)["version"] == 1
    assert load_checkpoint(sharded, shards=False)["model"] == {}  # a resume under --fsdp
    # the model that eval, export and analyze --checkpoint build from it
    built, _ = load_trained_model(sharded)
    for key, value in load_trained_model(single)[0].state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key


def _converted(sharded: Path, tmp_path: Path) -> Path:
    out = tmp_path / "one.pt"
    assert main(["convert", "--checkpoint", str(sharded), "--out", str(out)]) == 0
    return out


def _one_line_error(capsys, argv: list[str], pattern: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pattern in err, err


def test_convert_refuses_bad_input_in_one_line_and_writes_nothing(single, tmp_path, capsys):
    sharded = _shard(single, tmp_path / "run")
    out = tmp_path / "one.pt"
    convert = ["convert", "--checkpoint"]
    _one_line_error(capsys, [*convert, str(single), "--out", str(out)], "already a single file")
    _one_line_error(capsys, [*convert, str(tmp_path / "no.pt"), "--out", str(out)], "not exist")
    _one_line_error(capsys, [*convert, str(sharded), "--out", str(sharded)], "checkpoint itself")
    assert not out.exists()
    out.write_text("keep")
    _one_line_error(capsys, [*convert, str(sharded), "--out", str(out)], "exists")
    assert out.read_text() == "keep"
    assert convert_checkpoint(sharded, out, force=True) == out and load_checkpoint(out)["model"]


def test_a_missing_damaged_or_hostile_shards_folder_is_refused_in_one_line(
    single, tmp_path, capsys
):
    sharded = _shard(single, tmp_path / "run")
    folder = shards_folder(sharded, torch.load(sharded, weights_only=True))
    evaluate = ["eval", "--checkpoint", str(sharded)]

    data = folder / "__0_0.distcp"
    good = data.read_bytes()
    data.write_bytes(good[: len(good) // 2])  # truncated
    _one_line_error(capsys, evaluate, "cannot read the sharded states of checkpoint")
    data.write_bytes(good)

    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    meta = folder / ".metadata"
    good = meta.read_bytes()
    meta.write_bytes(pickle.dumps(Hostile()))
    _one_line_error(capsys, evaluate, "system is not allowed")
    assert not marker.exists()  # refused, never run
    meta.write_bytes(good)

    state = torch.load(sharded, weights_only=True)
    for forged in ("../../etc", "/tmp/x", 3):
        save_checkpoint(sharded, {**state, "shards": forged})
        with pytest.raises(CheckpointError, match="field shards must name a folder"):
            load_checkpoint(sharded)
    save_checkpoint(sharded, state)

    shutil.rmtree(folder)
    _one_line_error(capsys, evaluate, "missing or incomplete")
    with pytest.raises(UserError, match="missing or incomplete"):
        train(TrainConfig(out=str(tmp_path / "r"), resume=str(sharded), **RUN | {"epochs": 2}))
    assert not (tmp_path / "r").exists()


def test_force_replaces_a_sharded_run_with_its_shards_folder(single, tmp_path):
    run = tmp_path / "run"
    _shard(single, run)
    assert (run / "shards").is_dir()
    train(TrainConfig(out=str(run), force=True, **RUN | {"epochs": 1}))  # one process
    assert not (run / "shards").exists()
    assert torch.load(run / "last.pt", weights_only=True)["version"] == 1
