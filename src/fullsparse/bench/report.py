"""Report formatting: markdown tables of each suite's JSON-ready result.

Every suite returns a plain dict (what is saved as JSON); these functions turn one into
the table the CLI prints and ``--markdown`` saves. Nothing here measures anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["format_layers", "format_gpu", "format_steps", "machine_line"]


def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(head: str, align: str, rows: Iterable[str]) -> list[str]:
    """A blank line, then a markdown table: the header ``head`` ("a | b"), one column
    alignment a letter (``l`` left, ``r`` right), then the rows."""
    rule = "".join("---:|" if a == "r" else "---|" for a in align)
    return ["", f"| {head} |", "|" + rule, *rows]


def _targets(result: dict[str, Any], labels: dict[str, tuple[str, str]]) -> list[str]:
    """The table of ``result["targets"]``: per key its label, value, goal and whether met."""
    rows = []
    for key, (label, op) in labels.items():
        if key not in result["targets"]:
            continue  # a result written before this target existed
        t = result["targets"][key]
        met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
        rows.append(f"| {label} | {_f(t['value'])} | {op} {t['target']} | {met} |")
    return _table("target | value | goal | met", "lrrl", rows)


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the CPU, threads, torch, date and commit of a result's ``machine``."""
    load = m.get("load_average_1min")
    busy = f", load average {load}" if load is not None else ""
    alloc = " ".join(f"{k}={v}" for k, v in (m.get("allocator_env") or {}).items())
    return (
        f"CPU: {m['cpu']} ({m['torch_threads']} torch threads{busy}), torch {m['torch']}, "
        f"{m['date']}, commit {m['commit']}" + (f", allocator: {alloc}" if alloc else "")
    )


def format_layers(result: dict[str, Any]) -> str:
    """Markdown tables: per-role times and ratios vs dense, then the mask overhead."""
    lines = _table(
        "layer | recipe | forward ms | grad_input ms | grad_weight ms | total ms "
        "| grad_weight × | total ×",
        "llrrrrrr",
        (
            f"| {t['shape']} | {t['recipe']} | {t['forward_ms']:.2f} | {t['grad_input_ms']:.2f} "
            f"| {t['grad_weight_ms']:.2f} | {t['total_ms']:.2f} "
            f"| {t['ratios']['grad_weight']:.2f} | {t['ratios']['total']:.2f} |"
            for t in result["layers"]
        ),
    )[1:]  # the first table: no blank line above it
    lines += _table(
        "layer | S(W) ms | S(Wᵀ) ms | dense layer total ms | overhead %",
        "lrrrr",
        (
            f"| {o['shape']} | {o['s_w_ms']:.3f} | {o['s_wt_ms']:.3f} | "
            f"{o['dense_total_ms']:.2f} | {o['percent']:.2f} |"
            for o in result["mask_overhead"]
        ),
    )
    return "\n".join(lines)


def format_gpu(result: dict[str, Any]) -> str:
    """Markdown: machine, targets, correctness, per-layer timings, steps, overhead."""
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"GPU: {m.get('gpu') or 'none (dry run on CPU)'} ({m.get('capability')}), driver "
        f"{m.get('driver')}, torch {m.get('torch')}, CUDA {m.get('cuda')}, cuDNN "
        f"{m.get('cudnn')}, cuSPARSELt {m.get('cusparselt')}, 2:4 library "
        f"{m.get('sparse_library')}; {s['dtype']}, backend {s['backend']}, commit "
        f"{m.get('commit')}, {m.get('date')}",
    ]
    if s["dry_run"]:
        lines.append("")
        lines.append(
            "**Dry run: tiny shapes on CPU, emulation backend; the numbers mean nothing.**"
        )
    lines += _targets(
        result,
        {
            "fst_large_linear_total_speedup": (
                "fst layer total vs dense, ViT-L/GPT Linear (min)",
                ">=",
            ),
            "fst_vit_b_step_speedup": ("ViT-B/16 training step, dense / fst", ">="),
            "fst_overhead_percent": ("fst overhead, % of step (max)", "<="),
        },
    )
    lines += _table(
        "correctness: shape | recipe | 2:4 roles | out err | grad_in err | grad_w err | tol | ok",
        "lllrrrrl",
        (
            f"| {c['shape']} | {c['recipe']} | {', '.join(c['sparse_roles']) or 'none'} | "
            f"{c['rel_err']['output']:.1e} | {c['rel_err']['grad_input']:.1e} | "
            f"{c['rel_err']['grad_weight']:.1e} | "
            f"{c['tolerance']:.0e} | {'yes' if c['passed'] else 'NO'} |"
            for c in result["correctness"]
        ),
    )
    lines += _table(
        "layer | variant | forward ms | grad_input ms | grad_weight ms | total ms | fwd × "
        "| grad_in × | grad_w × | total ×",
        "llrrrrrrrr",
        (
            f"| {r['shape']} | {r['label']} | {_f(r['forward_ms'], 3)} | "
            f"{_f(r['grad_input_ms'], 3)} | {_f(r['grad_weight_ms'], 3)} | {_f(r['total_ms'], 3)} "
            f"| {_f(r['speedup']['forward'])} | {_f(r['speedup']['grad_input'])} "
            f"| {_f(r['speedup']['grad_weight'])} | {_f(r['speedup']['total'])} |"
            for r in result["layers"]
        ),
    )
    dense_ms = {r["model"]: r["step_ms"] for r in result["steps"] if r["recipe"] == "dense"}
    steps = []
    for r in result["steps"]:
        ratio = dense_ms.get(r["model"])
        ratio = ratio / r["step_ms"] if ratio else None
        be = ", ".join(f"{k}: {v}" for k, v in sorted(r["layer_backends"].items())) or "torch"
        steps.append(
            f"| {r['model']} | {r['recipe']} | {r['batch']} | {_f(r['step_ms'])} | "
            f"{_f(r['images_per_s'], 0)} | {_f(ratio)} | {be} |"
        )
    lines += _table(
        "model | recipe | batch | step ms | images/s | × dense | layer backends", "llrrrrl", steps
    )
    lines += _table(
        "overhead (fst) | S(W) ms | S(Wᵀ) ms | packing ms | IR shift ms | total ms | step ms "
        "| % of step",
        "lrrrrrrr",
        (
            f"| {o['model']} (batch {o['batch']}) | {_f(o['s_w_ms'], 3)} | {_f(o['s_wt_ms'], 3)} "
            f"| {_f(o['pack_ms'], 3)} | {_f(o['ir_shift_ms'], 3)} | {_f(o['total_ms'], 3)} "
            f"| {_f(o['step_ms'])} | {_f(o['percent'])} |"
            for o in result["overhead"]
        ),
    )
    if result["skipped"]:
        lines += ["", "Skipped for the time budget: " + "; ".join(result["skipped"])]
    lines += ["", f"Suite time: {result['elapsed_s']:.0f} s of a {s['budget_s']:.0f} s budget."]
    return "\n".join(lines)


def _best_label(result: dict[str, Any], key: str = "best_step_speedup_min") -> str:
    best = result["targets"].get(key, {})
    per = ", ".join(f"{n} {_f(v)}×" for n, v in best.get("per_recipe", {}).items())
    what = "step speed-up" if key == "best_step_speedup_min" else "paired interval's low end"
    return f"best recipe's {what}, min over cases ({best.get('recipe')}; {per})"


def _paired(r: dict[str, Any]) -> str:
    p = r.get("speedup_paired")
    if not p:
        return "-"
    return f"{_f(p['median'])}× ({_f(p['low'])}–{_f(p['high'])}, {100 * p['coverage']:.0f} %)"


def format_steps(result: dict[str, Any]) -> str:
    """Markdown: whole steps per case and recipe, the weight-side work, the fst weight
    gradient alone, and the targets."""
    lines = [machine_line(result["machine"])]
    lines += _table(
        "case | recipe | batch | step ms | speed-up vs dense | paired, round by round "
        "(interval, coverage) | peak memory MiB | sparse layers",
        "llrrrrrr",
        (
            f"| {r['case']} | {r['recipe']} | {r['batch']} | {_f(r['step_ms'])} | "
            f"{_f(r['speedup_vs_dense'])}× | {_paired(r)} | {_f(r['peak_memory_mb'], 1)} | "
            f"{r['sparse_layers']} |"
            for r in result["steps"]
        ),
    )
    lines += _table(
        "weight-side work: case | recipe | layers | ms per step | % of dense step "
        "| sampling ms | sampling % of dense step | sampling in the step, ms | in the step, %",
        "llrrrrrrr",
        (
            f"| {w['case']} | {w['recipe']} | {w['layers']} | {_f(w['ms'], 3)} | "
            f"{_f(w['percent_of_dense_step'])} | {_f(w.get('sampling_ms'), 3)} | "
            f"{_f(w.get('sampling_percent_of_dense_step'))} | "
            f"{_f(w.get('sampling_in_step_ms'), 3)} | "
            f"{_f(w.get('sampling_in_step_percent_of_dense_step'))} |"
            for w in result["weight_side"]
        ),
    )
    gw = result.get("grad_weight")
    if gw:
        s = gw["shape"]
        timed = gw.get("recipes") or {"fst": {"ms": gw["fst_ms"], "speedup": gw["speedup"]}}  # noqa: F841
        lines += [
            "",
            f"grad_weight alone, {s['batch']}x{s['cin']}x{s['size']}x{s['size']} -> {s['cout']} "
            f"channels, {s['kernel']}x{s['kernel']}: dense {_f(gw['dense_ms'])} ms, "
            + ", ".join(
                f"{n} {_f(v['ms'])} ms ({_f(v['speedup'])}×)"
                for n, v in gw.get(
                    "recipes", {"fst": {"ms": gw["fst_ms"], "speedup": gw["speedup"]}}
                ).items()
            ),
        ]
    lines += _targets(
        result,
        {
            "fst_step_speedup_min": ("fst step speed-up vs dense (min over cases)", ">="),
            "best_step_speedup_min": (_best_label(result), ">="),
            "best_step_speedup_low": (_best_label(result, "best_step_speedup_low"), ">="),
            "weight_side_percent_max": ("weight-side work, % of dense step (max)", "<"),
            "sampling_percent_max": ("weight-gradient sampling, % of dense step (max)", "<"),
            "fst_grad_weight_speedup": ("fst grad_weight alone vs dense at 56x56", ">="),
        },
    )
    return "\n".join(lines)
