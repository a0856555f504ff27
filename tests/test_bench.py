"""The benchmarks run end to end on tiny shapes and report what they timed; the harness
warms up, interleaves and measures memory as documented. No timing is asserted."""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

from fullsparse.bench import ConvShape, bench_layers, format_layers
from fullsparse.bench.harness import (
    interleaved_ms,
    interleaved_times,
    median_interval,
    median_ms,
    paired_speedup,
    peak_memory_bytes,
)
from fullsparse.bench.ops import recipe, weight_side_work
from fullsparse.bench.steps import STEP_CASES
from fullsparse.bench.steps import _batch as bench_batch
from fullsparse.cli import main
from fullsparse.nn import SparseLinear, sparse_modules
from reference import ref_weight_operands

TINY = [ConvShape("tiny 3x3 8-8 @8", 8, 8, 3, 1, 8, 2), ConvShape("tiny 3x3/2", 4, 8, 3, 2, 9, 2)]


# --------------------------------------------------------------------------- the harness
def test_harness_always_warms_up_once_even_with_warmup_zero():
    calls: list[int] = []
    median_ms(calls.append, warmup=0, repeats=3)
    assert calls == [0, 1, 2, 3]  # one untimed warm-up call, then the three timed ones


def test_harness_rotates_the_order_of_interleaved_callables():
    order: list[str] = []
    fns = {name: (lambda i, name=name: order.append(name)) for name in "abc"}
    ms = interleaved_ms(fns, warmup=1, repeats=3)
    assert set(ms) == {"a", "b", "c"} and all(v >= 0 for v in ms.values())
    assert order == list("abc" + "abc" + "bca" + "cab")  # warm-up, then rotated rounds


def test_interleaved_times_keeps_every_round_in_order():
    # "a" sleeps 8 ms longer each round (its call index: 1, 2, 3, 4 after the warm-up)
    fns = {"a": lambda i: time.sleep(0.008 * i), "b": lambda i: None}
    times = interleaved_times(fns, warmup=1, repeats=4)
    assert set(times) == {"a", "b"} and all(len(t) == 4 for t in times.values())
    assert times["a"] == sorted(times["a"]) and times["a"][0] >= 8.0
    assert max(times["b"]) < min(times["a"])


def _coverage_by_enumeration(n: int, j: int) -> float:
    """P(x_(j) <= median <= x_(n+1-j)) for n draws of a continuous distribution: each draw
    falls below the median with probability 1/2, independently; the interval holds the
    median when at least j draws fall below it and at least j above."""
    hits = 0
    for signs in range(2**n):
        below = bin(signs).count("1")
        hits += below >= j and n - below >= j
    return hits / 2**n


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 12, 16, 17])
def test_median_interval_takes_the_narrowest_order_statistics_with_the_coverage(n):
    values = [float((7 * i) % n) + 0.5 * i for i in range(n)]  # distinct, shuffled
    low, high, coverage = median_interval(values, 0.95)
    xs = sorted(values)
    j = xs.index(low) + 1
    assert high == xs[n - j]
    assert coverage == pytest.approx(_coverage_by_enumeration(n, j))
    # j is the largest index whose interval still has the coverage (else the smallest one)
    assert coverage >= 0.95 or j == 1
    if j + 1 <= (n + 1) // 2:
        assert _coverage_by_enumeration(n, j + 1) < 0.95
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_paired_speedup_is_the_ratio_round_by_round():
    dense = [10.0, 20.0, 10.0, 40.0, 10.0]
    fast = [5.0, 10.0, 10.0, 20.0, 20.0]  # 2, 2, 1, 2, 0.5: a drifting machine
    p = paired_speedup(dense, fast)
    assert p["median"] == 2.0 and (p["low"], p["high"]) == (0.5, 2.0)
    assert p["coverage"] == pytest.approx(1 - 2 / 32)
    # the medians' ratio of the same rounds says 1.0 here
    assert statistics.median(dense) / statistics.median(fast) == 1.0
    with pytest.raises(ValueError, match="same, non-zero length"):
        paired_speedup(dense, fast[:2])


def test_peak_memory_counts_the_most_bytes_live_at_once_on_cpu():
    mib = 1 << 20

    def fn() -> None:
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a
        c = torch.empty(mib, dtype=torch.uint8)
        del b, c

    peak = peak_memory_bytes(fn, torch.device("cpu"))
    assert 3 * mib <= peak < 3 * mib + 64 * 1024  # a and b together; c comes after a is freed


@pytest.mark.parametrize("name", ["fst", "srste", "tsm", "dense"])
def test_weight_side_work_is_the_steps_weight_operands(name):
    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    cfg = recipe(name)
    out_mask, w_gi, decay = weight_side_work(w, cfg)
    w_out, ref_gi, row = ref_weight_operands(w.reshape(8, -1), name)
    got_out = w if out_mask is None else w * out_mask
    torch.testing.assert_close(got_out.reshape(8, -1), w_out, rtol=0, atol=0)
    torch.testing.assert_close(w_gi.reshape(8, -1), ref_gi, rtol=0, atol=0)
    if row[5]:
        torch.testing.assert_close(decay, row[5] * (w - got_out), rtol=0, atol=0)
    else:
        assert decay is None


def test_weight_side_work_adds_a_deferred_decay_to_the_gradient_given(monkeypatch):
    """float32 on a CPU: the native weight side leaves the decay to the backward, which adds
    it to the weight gradient; the benchmark's work does the same to ``grad``."""
    torch.manual_seed(4)
    w, grad = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    cfg = recipe("fst")
    with monkeypatch.context() as m:
        m.setenv("FULLSPARSE_NATIVE", "off")
        want = weight_side_work(w, cfg)[2]  # the decay tensor of the eager path
    got = weight_side_work(w, cfg, grad=grad.clone())[2]
    torch.testing.assert_close(got, grad + want, rtol=0, atol=0)
    torch.testing.assert_close(weight_side_work(w, cfg)[2], want, rtol=0, atol=0)


# --------------------------------------------------------------------------- bench layers
def test_bench_layers_reports_every_role_with_dense_first():
    result = bench_layers(TINY, ["fst", "tsm"], warmup=0, repeats=1)
    assert result["settings"]["warmup"] == 1  # at least one warm-up round, always
    rows = result["layers"]
    assert [(r["shape"], r["recipe"]) for r in rows] == [
        (s.name, name) for s in TINY for name in ("dense", "fst", "tsm")
    ]
    for r in rows:
        for role in ("forward", "grad_input", "grad_weight", "total"):
            assert r[f"{role}_ms"] > 0
            assert r["ratios"][role] > 0
        if r["recipe"] == "dense":
            assert all(v == 1.0 for v in r["ratios"].values())
    assert [o["shape"] for o in result["mask_overhead"]] == [s.name for s in TINY]
    assert result["machine"]["torch"]
    table = format_layers(result)
    assert table.count("\n| tiny 3x3 8-8 @8 |") == 3 + 1 and "overhead %" in table


def _layers_args(out, md=None):
    args = ["bench", "layers", "--inputs", "cifar", "--recipes", "fst", "--cifar-batch", "1"]
    args += ["--repeats", "1", "--warmup", "0", "--json", str(out), "--quiet"]
    return args + (["--markdown", str(md)] if md else [])


def test_bench_cli_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    assert main(_layers_args(out, md)) == 0
    data = json.loads(out.read_text())
    assert {r["recipe"] for r in data["layers"]} == {"dense", "fst"}
    assert data["settings"]["warmup"] == 1
    assert "| layer | recipe |" in md.read_text()
    assert "saved" in capsys.readouterr().out


def test_bench_layers_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "b.json"
    out.write_text("earlier results")
    assert main(_layers_args(out)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out} already exists; pass --force to overwrite it\n"
    assert out.read_text() == "earlier results"  # nothing lost
    assert main([*_layers_args(out), "--force"]) == 0
    assert json.loads(out.read_text())["layers"]


def test_bench_cli_rejects_unknown_recipe(capsys):
    assert main(["bench", "layers", "--recipes", "fast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe(s) fast") and err.count("\n") == 1


# --------------------------------------------------------------------------- bench steps
def test_bench_steps_runs_every_tiny_case_and_saves_the_documented_json(tmp_path, capsys):
    out, md = tmp_path / "s.json", tmp_path / "s.md"
    args = ["bench", "steps", "--cases", "tiny", "--recipes", "fst,tsm", "--repeats", "1"]
    args += ["--warmup", "0", "--grad-weight-batch", "1", "--json", str(out)]
    assert main([*args, "--markdown", str(md), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "settings", "steps", "weight_side", "grad_weight", "targets"}
    tiny = [c for c in STEP_CASES if c.startswith("tiny-")]
    assert [c["name"] for c in data["settings"]["cases"]] == tiny
    assert data["settings"]["recipes"] == ["dense", "fst", "tsm"]
    assert data["settings"]["warmup"] == 1
    assert [(r["case"], r["recipe"]) for r in data["steps"]] == [
        (c, r) for c in tiny for r in ("dense", "fst", "tsm")
    ]
    for r in data["steps"]:
        assert set(r) == {
            "case", "recipe", "batch", "step_ms", "speedup_vs_dense", "speedup_paired",
            "peak_memory_mb", "sparse_layers",
        }  # fmt: skip
        paired = r["speedup_paired"]
        assert set(paired) == {"median", "low", "high", "coverage"}
        # one round: the interval is that round's ratio, and it covers nothing
        assert paired["low"] == paired["median"] == paired["high"]
        assert paired["coverage"] == 0.0
        assert r["step_ms"] > 0 and r["peak_memory_mb"] > 0
        assert (r["sparse_layers"] == 0) == (r["recipe"] == "dense")
        assert r["recipe"] != "dense" or r["speedup_vs_dense"] == 1.0
    assert [(w["case"], w["recipe"]) for w in data["weight_side"]] == [
        (c, r) for c in tiny for r in ("fst", "tsm")
    ]
    for w in data["weight_side"]:
        assert w["ms"] > 0 and w["layers"] > 0
        assert w["percent_of_dense_step"] == pytest.approx(100 * w["ms"] / w["dense_step_ms"])
    gw = data["grad_weight"]
    assert gw["shape"]["batch"] == 1 and gw["shape"]["size"] == 56 and gw["dense_ms"] > 0
    assert set(data["targets"]) == {
        "fst_step_speedup_min",
        "best_step_speedup_min",
        "best_step_speedup_low",
        "weight_side_percent_max",
        "sampling_percent_max",
        "fst_grad_weight_speedup",
    }
    assert data["targets"]["sampling_percent_max"]["value"] is None  # fst, tsm sample nothing
    best = data["targets"]["best_step_speedup_min"]
    per_recipe = {
        name: min(r["speedup_vs_dense"] for r in data["steps"] if r["recipe"] == name)
        for name in ("fst", "tsm")
    }
    assert best["per_recipe"] == per_recipe
    assert best["value"] == max(per_recipe.values()) and best["recipe"] in per_recipe
    low = data["targets"]["best_step_speedup_low"]
    assert low["per_recipe"] == {
        name: min(r["speedup_paired"]["low"] for r in data["steps"] if r["recipe"] == name)
        for name in ("fst", "tsm")
    }
    assert low["value"] == max(low["per_recipe"].values())
    printed = capsys.readouterr().out
    assert "| tiny-gpt | tsm | 2 |" in printed and "| weight-side work: case |" in printed
    assert "grad_weight alone, 1x64x56x56" in printed and f"saved {out}" in printed
    assert md.read_text().startswith("CPU: ")
    # the paired column: median, interval and its coverage (one round: 0 %)
    tsm = next(r for r in data["steps"] if r["case"] == "tiny-gpt" and r["recipe"] == "tsm")
    p = tsm["speedup_paired"]
    assert f"| {p['median']:.2f}× ({p['low']:.2f}–{p['high']:.2f}, 0 %) |" in printed
    assert "best recipe's paired interval's low end, min over cases" in printed


def test_bench_steps_rejects_unknown_case_and_existing_output(tmp_path, capsys):
    assert main(["bench", "steps", "--cases", "resnet99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown case(s) resnet99; choose from resnet20,")
    assert err.count("\n") == 1
    out = tmp_path / "s.json"
    out.write_text("{}")
    assert main(["bench", "steps", "--cases", "tiny-gpt", "--json", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    # the old spelling --out still names the JSON file, with a deprecation warning
    assert main(["bench", "steps", "--cases", "tiny-gpt", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "warning: --out is deprecated; use --json"
    assert err[1] == f"error: {out} already exists; pass --force to overwrite it"
    assert out.read_text() == "{}"


# --------------------------------------------------------------------------- bench gpu (CPU parts)
def test_gpu_suite_cases_fit_the_2to4_tile_rule_and_quick_keeps_the_largest():
    from fullsparse.bench.cases import suite_cases
    from fullsparse.kernels import LayerShape, plan_layer
    from fullsparse.kernels.dispatch import Platform

    h100 = Platform("cuda", "NVIDIA H100", (9, 0), cusparselt=True)
    linears, convs = suite_cases(vit_batch=4, conv_batch=2)
    quick_l, quick_c = suite_cases(quick=True, vit_batch=4, conv_batch=2)
    assert (len(linears), len(convs), len(quick_l), len(quick_c)) == (10, 12, 6, 4)
    assert {c.name for c in quick_l} <= {c.name for c in linears}
    for case in linears:  # every timed Linear shape runs both 2:4 roles of fst on a GPU
        layer = LayerShape("linear", (case.d_out, case.d_in))
        plan = plan_layer(layer, recipe("fst"), "auto", h100, torch.bfloat16)
        assert plan.backend == "semi_structured" and plan.output and plan.grad_input
    for case in convs:
        assert case.out_size == (case.size + 2 * case.padding - case.kernel) // case.stride + 1
        assert case.gemm_flops == 2 * case.cout * case.cin * case.kernel**2 * case.batch * (
            case.out_size**2
        )
    assert all(c.batch == 2 for c in convs) and all(c.batch == 4 for c in linears[:8])  # ViT rows


def test_bench_steps_mask_interval_amortizes_the_weight_side_work(monkeypatch):
    """Weight-side work with masks every N steps = the cached step's work + (full − cached)/N;
    the recipes without an S_K forward ignore the interval."""
    from fullsparse.bench import steps

    assert steps._config("fst", 40).mask_interval == 40
    assert (
        steps._config("tsm", 40).mask_interval == 1 and steps._config("dense", 40).name == "dense"
    )
    model = steps._build(STEP_CASES["tiny-gpt"], "fst", torch.device("cpu"), 40)
    assert {m.config.mask_interval for _, m in sparse_modules(model)} == {40}
    timings = iter([{"dense": 8.0, "work": 10.0, "cached": 2.0}])
    calls = []
    monkeypatch.setattr(steps, "interleaved_times", lambda fns, *a, **k: calls.append(set(fns))
                        or {"fst": [5.0], "dense": [5.0]})  # fmt: skip
    monkeypatch.setattr(steps, "interleaved_ms", lambda fns, *a, **k: calls.append(set(fns))
                        or next(timings))  # fmt: skip
    monkeypatch.setattr(steps, "peak_memory_bytes", lambda *a, **k: 0)
    _, side = steps._bench_case(STEP_CASES["tiny-gpt"], ["dense", "fst"], 1, 1,
                                torch.device("cpu"), 40)  # fmt: skip
    assert side[0]["ms"] == pytest.approx(2.0 + (10.0 - 2.0) / 40)
    # the work is timed in the rounds of a dense step, its percentage of that step
    assert calls[1] == {"dense", "work", "cached"}
    assert side[0]["dense_step_ms"] == 8.0
    assert side[0]["percent_of_dense_step"] == pytest.approx(100 * side[0]["ms"] / 8.0)


def test_bench_steps_sampling_groups_reach_only_the_recipes_they_steer(tmp_path, capsys):
    from fullsparse.bench import steps

    sampling = {"sample_group": 64, "sample_share": 0.5625}
    got = {n: steps._config(n, 1, sampling) for n in ("fst_is", "fst_adaptive", "fst", "dense")}
    assert (got["fst_is"].sample_group, got["fst_is"].sample_share) == (64, 0.5625)
    assert (got["fst_adaptive"].sample_group, got["fst_adaptive"].sample_share) == (64, 0.5)
    assert got["fst"] == steps._config("fst", 1) and got["dense"].name == "dense"
    model = steps._build(STEP_CASES["tiny-gpt"], "fst_is", torch.device("cpu"), 1, sampling)
    assert {m.config.sample_group for _, m in sparse_modules(model)} == {64}
    argv = ["bench", "steps", "--cases", "tiny-gpt", "--recipes", "fst_is", "--sample-group",
            "6", "--json", str(tmp_path / "b.json")]  # fmt: skip
    assert main(argv) == 2
    assert "sample_group must be 0 (the whole call) or a multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_bench_steps_masked_decay_reaches_the_sparse_recipes_their_steps_and_weight_side(
    tmp_path, capsys, monkeypatch
):
    import fullsparse.masked_decay
    import fullsparse.nn
    from fullsparse.bench import steps

    decay = {"decay_kind": "masked_grad", "decay": 6e-5}
    got = {
        n: steps._config(n, 1, None, decay) for n in ("fst_is_batch", "fst_mvue", "tsm", "dense")
    }
    assert (got["fst_is_batch"].decay_kind, got["fst_is_batch"].decay) == ("masked_grad", 6e-5)
    assert got["fst_mvue"].decay_kind == "masked_grad"
    assert got["tsm"] == recipe("tsm") and got["dense"].name == "dense"  # no decay to move
    case, cpu = STEP_CASES["tiny-gpt"], torch.device("cpu")
    model = steps._build(case, "fst_is_batch", cpu, 1, None, decay)
    layers = [m for _, m in sparse_modules(model)]
    assert {m.config.decay_kind for m in layers} == {"masked_grad"}
    calls, real = [], fullsparse.nn.masked_grad_decay_
    monkeypatch.setattr(fullsparse.nn, "masked_grad_decay_", lambda m: calls.append(real(m)))
    step = steps._step_fn(case, model, cpu)
    step(0), step(1)
    assert calls == [len(layers)] * 2  # once per optimizer step, every sparse layer
    added = []
    monkeypatch.setattr(fullsparse.masked_decay, "module_masked_decay_",
                        lambda m, g: added.append((m, g.shape)))  # fmt: skip
    count, work = steps._weight_side_fn(model)
    work(0)
    assert count == len(layers) and added == [(m, m.weight.shape) for m in layers]
    argv = ["bench", "steps", "--cases", "tiny-gpt", "--decay-kind", "masked_grad", "--decay",
            "0", "--json", str(tmp_path / "d.json")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: decay_kind='masked_grad' clashes with decay=0.0")
        and err.count("\n") == 1
    )
    assert not (tmp_path / "d.json").exists()


def test_bench_steps_times_the_weight_gradient_sampling_of_sampling_recipes():
    from fullsparse.bench.steps import bench_steps

    result = bench_steps(["tiny-gpt"], ["fst", "fst_is", "fst_mvue"], warmup=1, repeats=1,
                         grad_weight_shape=None)  # fmt: skip
    rows = {r["recipe"]: r for r in result["weight_side"]}
    assert "sampling_ms" not in rows["fst"]  # fst's weight gradient samples nothing
    for name in ("fst_is", "fst_mvue"):
        assert rows[name]["sampling_layers"] == rows[name]["layers"] == 4
        assert rows[name]["sampling_ms"] > 0
        assert rows[name]["sampling_in_step_ms"] > 0  # also clocked inside the steps
    worst = max(
        max(rows[n]["sampling_percent_of_dense_step"],
            rows[n]["sampling_in_step_percent_of_dense_step"])
        for n in ("fst_is", "fst_mvue")
    )  # fmt: skip
    assert result["targets"]["sampling_percent_max"]["value"] == worst


def test_machine_info_names_the_allocator_environment(monkeypatch):
    from fullsparse.bench.harness import machine_info
    from fullsparse.bench.report import machine_line

    for key in list(os.environ):
        if key.startswith("MALLOC_") or key in ("LD_PRELOAD", "GLIBC_TUNABLES"):
            monkeypatch.delenv(key)
    plain = machine_info()
    assert plain["allocator_env"] == {} and "allocator" not in machine_line(plain)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    tuned = machine_info()
    assert tuned["allocator_env"] == {
        "LD_PRELOAD": "/usr/lib/libjemalloc.so.2",
        "MALLOC_MMAP_THRESHOLD_": "33554432",
    }
    line = machine_line(tuned)
    assert line.endswith(
        "allocator: LD_PRELOAD=/usr/lib/libjemalloc.so.2 MALLOC_MMAP_THRESHOLD_=33554432"
    )


def test_the_sampling_clock_counts_nested_marked_calls_once(monkeypatch):
    from fullsparse import clock as clock_module
    from fullsparse.clock import SamplingClock, running, sampling_part

    ticks = iter(range(100))  # each reading of the time one second later
    monkeypatch.setattr(clock_module.time, "perf_counter", lambda: float(next(ticks)))
    calls = []

    @sampling_part
    def inner(x):
        calls.append(x)
        return x + 1

    @sampling_part
    def outer(x):
        return inner(x) * 2

    assert outer(1) == 4  # no clock: plain calls, no reading of the time
    clock = SamplingClock()
    with running(clock):
        outer(2)  # one interval: the inner call is inside it
        assert clock.seconds == 1.0
        inner(3)
        assert clock.seconds == 2.0
        clock.reset()
        assert clock.seconds == 0.0
    outer(4)  # stopped: nothing more counted
    assert clock.seconds == 0.0 and calls == [1, 2, 3, 4]
    assert next(ticks) == 4  # the time was read only while the clock ran


def test_bench_steps_clocks_the_sampling_inside_the_steps():
    """fst_is's sampling clocked in its timed steps: positive, in the row with the replayed
    measure; fst samples nothing and has no such entry."""
    from fullsparse.bench import steps

    _, side = steps._bench_case(STEP_CASES["tiny-gpt"], ["dense", "fst", "fst_is"], 1, 2,
                                torch.device("cpu"))  # fmt: skip
    rows = {r["recipe"]: r for r in side}
    assert "sampling_in_step_ms" not in rows["fst"]
    row = rows["fst_is"]
    assert row["sampling_in_step_ms"] > 0 and row["sampling_ms"] > 0
    assert row["sampling_in_step_percent_of_dense_step"] > 0


def test_the_layer_overhead_script_counts_layers_and_writes_json(tmp_path, capsys):
    """``scripts/layer_overhead.py``: one row per case and recipe, the sparse layers counted
    (none for dense), the excess the step time minus dense's; bad values one usage line."""
    from conftest import load_script

    script = load_script("layer_overhead")
    out = tmp_path / "overhead.json"
    assert script.main(["--cases", "tiny-gpt", "--recipes", "path,fst2,fst_is_batch",
                        "--repeats", "2", "--json", str(out), "--full-size"]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["path", "fst2", "fst_is_batch"]
    for r in rows:
        assert r["sparse_layers"] > 0 and r["full_size"] is True
        assert r["excess_ms"] == pytest.approx(r["step_ms"] - r["dense_step_ms"])
        assert r["excess_us_per_layer"] == pytest.approx(1000 * r["excess_ms"] / r["sparse_layers"])
        paired = r["speedup_paired"]
        assert paired["low"] <= paired["median"] <= paired["high"]
    assert capsys.readouterr().out.count("| tiny-gpt |") == 3
    # path: the same layers as a recipe's, every operand dense (no masks, no decay)
    model = script.build(script.STEP_CASES["tiny-gpt"], "path")
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == rows[1]["sparse_layers"]
    assert all(m.config.output_weight == "dense" and m.config.decay == 0 for m in layers)
    assert all(m.config.grad_weight_mode == "dense" for m in layers)
    # function: the same layers as minimal autograd functions, dense's gradients to the bit
    for name in ("tiny-gpt", "tiny-resnet20"):
        case = script.tiny(name)
        dense, fn = (
            script._build(case, "dense", torch.device("cpu")),
            script.build(case, "function"),
        )
        swapped = [m for m in fn.modules() if type(m) in (script._FnLinear, script._FnConv2d)]
        assert len(swapped) == len(list(sparse_modules(script.build(case, "path"))))
        x, y = bench_batch(case, torch.device("cpu"))
        for m in (dense.double(), fn.double()):
            xx = x.double() if x.is_floating_point() else x
            torch.nn.functional.cross_entropy(m(xx).flatten(0, -2), y.flatten()).backward()
        for (n, a), b in zip(dense.named_parameters(), fn.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), n
    for bad in (["--repeats", "0"], ["--cases", "nope"], ["--recipes", "dense"]):
        with pytest.raises(SystemExit) as exc:
            script.main(bad)
        assert exc.value.code == 2


def test_the_weight_grad_kernels_script_times_both_kernels(tmp_path, capsys):
    """``scripts/weight_grad_kernels.py``: per shape, oneDNN and the GEMM timed, their
    ratios, and whether the rule picks the GEMM; bad values one usage line, exit 2."""
    from conftest import load_script

    script = load_script("weight_grad_kernels")
    out = tmp_path / "kernels.json"
    assert script.main(["--shape", "2,8,8,4,3,1", "--shape", "1,4,8,5,1,2", "--repeats", "1",
                        "--threads", "1", "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["reduction"] for r in rows] == [32, 9]
    for r in rows:
        t = r["ms"]
        assert r["weight_ratio"] == pytest.approx(t["weight_gemm"] / t["weight_onednn"])
        assert r["both_ratio"] == pytest.approx(t["both_split"] / t["both_onednn"])
        assert r["rule_picks_gemm"] is False  # small weights: oneDNN
    assert len(capsys.readouterr().out.splitlines()) == 4
    for bad in (["--repeats", "0"], ["--shape", "2,8,8"], ["--shape", "2,8,8,4,0,1"]):
        with pytest.raises(SystemExit) as exc:
            script.main(bad)
        assert exc.value.code == 2


def test_the_linear_weight_grad_script_times_dense_and_sampled_by_width(tmp_path, capsys):
    """``scripts/linear_weight_grad.py``: per width the block's three Linear shapes, the
    dense and the sampled weight gradient timed round by round, the paired speed-up; bad
    values one usage line, exit 2."""
    from conftest import load_script

    script = load_script("linear_weight_grad")
    out = tmp_path / "linear.json"
    assert script.main(["--width", "8", "--tokens", "16", "--repeats", "2", "--threads", "1",
                        "--json", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["share"] == 0.59 and data["tokens"] == 16
    assert [(r["layer"], r["d_in"], r["d_out"]) for r in data["rows"]] == [
        ("qkv", 8, 24), ("fc1", 8, 32), ("fc2", 32, 8),
    ]  # fmt: skip
    for r in data["rows"]:
        s = r["speedup"]
        assert s["low"] <= s["median"] <= s["high"] and s["coverage"] == 0.5  # 2 rounds
        assert r["sampling_share_of_dense"] == pytest.approx(r["ms"]["sampling"] / r["ms"]["dense"])
    assert len(capsys.readouterr().out.splitlines()) == 2 + 3
    for bad in (["--repeats", "0"], ["--share", "1"], ["--width", "0"], ["--tokens", "1"]):
        with pytest.raises(SystemExit) as exc:
            script.main(bad)
        assert exc.value.code == 2
