"""``fullsparse analyze similarity|neighbors|fidelity|overhead``: the paper's measurements.

Each subcommand parses flags, calls one function of :mod:`fullsparse.analysis`, prints a
markdown table and writes ``<name>.json``, ``<name>.md`` and (with the ``plot`` extra)
``<name>.png`` into ``--out``. Every ``.md`` starts with the command that made it, the date
and the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fullsparse.errors import UserError
from fullsparse.recipes import RECIPES

#: The splits the images of an analysis come from.
SPLITS = ("train", "test")

_DEFAULT_OUT = "runs/analysis"


# --------------------------------------------------------------------------- shared flags
#: The line of ``fullsparse --help`` and the text of ``fullsparse analyze --help``.
HELP = "the paper's measurements: similarity, neighbors, fidelity, overhead"
DESCRIPTION = (
    "Measure what the FST paper argues from, on your model and data. Each writes <name>.json,"
    " <name>.md and <name>.png (plot extra) into --out."
)


def _add_model_args(p: argparse.ArgumentParser, images: int | None, split: str = "test") -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--checkpoint",
        metavar="PATH",
        default=None,
        help="a run's last.pt/best.pt: its trained model, dataset and image size "
        "(default: --model at random init)",
    )
    g.add_argument("--model", default="resnet20", help="model at random init")
    g.add_argument("--dataset", default="fashion-mnist", help="dataset of the images")
    g.add_argument("--data-dir", default=None, help="dataset folder")
    g.add_argument(
        "--image-size", type=int, default=None, help="input size (default: the dataset's own)"
    )
    if images is not None:
        g.add_argument("--images", type=int, default=images, help="images to use")
    g.add_argument(
        "--split",
        choices=SPLITS,
        metavar="SPLIT",
        default=split,
        help="split the first --images images come from",
    )
    g.add_argument("--seed", type=int, default=0, help="init and noise seed")


def _add_run_args(p: argparse.ArgumentParser, name: str, plot: bool = True) -> None:
    from fullsparse.train.config import DEVICES

    g = p.add_argument_group("execution and output")
    g.add_argument(
        "--device", choices=DEVICES, metavar="DEVICE", default="auto", help="where to run"
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    g.add_argument(
        "--out",
        type=Path,
        default=Path(_DEFAULT_OUT),
        help=f"folder for {name}.json/.md{'/.png' if plot else ''}",
    )
    if plot:
        g.add_argument("--no-plot", dest="plot", action="store_false", help=f"skip {name}.png")
    g.add_argument("--quiet", action="store_true", help="no progress lines")


def _command_line(args: argparse.Namespace) -> str:
    """The command, with every option that differs from its default, as a shell line."""
    parser: argparse.ArgumentParser = args._parser
    words = ["fullsparse", "analyze", args.analyze_command]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "_parser"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = (
            action.option_strings[-1]
            if action.option_strings[-1].startswith("--")
            else (action.option_strings[0])
        )
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            words.append(flag)
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _header(args: argparse.Namespace, what: str, extra: list[str]) -> tuple[str, dict[str, Any]]:
    from fullsparse.bench import machine_info

    machine = machine_info()
    command = _command_line(args)
    cuda = f", CUDA {machine['cuda']}" if machine["cuda"] else ""
    lines = [
        f"# {what}",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {machine['date']}; machine: {machine['cpu']} ({machine['torch_threads']} torch "
        f"threads){cuda}; torch {machine['torch']}; commit {machine['commit']}.",
    ]
    lines += ["", *extra] if extra else []
    return "\n".join(lines), {"command": command, "machine": machine}


def _setup(args: argparse.Namespace) -> Any:
    import torch

    from fullsparse.analysis.inputs import resolve_device

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def _inputs(args: argparse.Namespace, images: int | None = None) -> Any:
    from fullsparse.analysis.inputs import load_inputs

    return load_inputs(
        checkpoint=args.checkpoint,
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        image_size=args.image_size,
        images=images if images is not None else args.images,
        seed=args.seed,
        split=args.split,
    )


def _source_line(source: dict[str, Any]) -> str:
    if source.get("checkpoint"):
        model = (
            f"{source['model']} from checkpoint `{source['checkpoint']}` (recipe "
            f"{source['recipe']}, epoch {source['epoch']}, best top-1 "
            f"{source.get('best_top1') or float('nan'):.2f}%)"
        )
    else:
        model = f"{source['model']} at {source['init']}"
    return (
        f"Model: {model}; images: the first {source['images']} of the {source['dataset']} "
        f"{source['split']} split ({source['image_size']}×{source['image_size']})."
    )


def _write(
    out: Path, name: str, header: str, table: str, payload: dict[str, Any], notes: list[str]
) -> None:
    from fullsparse.train.checkpoint import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    text = header + "\n\n" + table + "\n" + "".join(f"\n{n}\n" for n in notes)
    atomic_write_bytes(out / f"{name}.md", text.encode())
    atomic_write_bytes(out / f"{name}.json", (json.dumps(payload, indent=2) + "\n").encode())


def _plot_note(made: bool, path: Path) -> str:
    from fullsparse.analysis.plots import MATPLOTLIB_HINT

    if made:
        return f"![{path.stem}]({path.name})"
    return f"{path.name} skipped: matplotlib is not installed ({MATPLOTLIB_HINT})"


def _title(source: dict[str, Any]) -> str:
    return f"{source['model']} on {source['dataset']}"


def _finish(
    args: argparse.Namespace,
    name: str,
    what: str,
    text: str,
    table: str,
    data: dict[str, Any],
    *,
    source: dict[str, Any] | None = None,
    plot: Callable[[Path], bool] | None = None,
    shown: str | None = None,
    saved: str = "",
) -> int:
    """Write ``<name>.md`` (header ``what``, the model/data ``source`` line, ``text``, the
    table) and ``<name>.json`` (``data`` with the command, machine and source), draw
    ``<name>.png`` with ``plot`` unless ``--no-plot``, print ``shown`` (default: the table),
    the plot note and where it all went."""
    header, meta = _header(args, what, [_source_line(source), "", text] if source else [text])
    payload = {**meta, **({"source": source} if source else {}), **data}
    notes = []
    if plot is not None and args.plot:
        png = args.out / f"{name}.png"
        notes.append(_plot_note(plot(png), png))
    _write(args.out, name, header, table, payload, notes)
    print(table if shown is None else shown)
    for n in notes:
        print(n)
    print(f"saved {args.out / (name + '.md')}{saved} and {name}.json")
    return 0


def _log(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("a comma-separated list needs at least one name")
    return names


# --------------------------------------------------------------------------- similarity
def run_similarity(args: argparse.Namespace) -> int:
    from fullsparse.analysis.inputs import white_noise
    from fullsparse.analysis.plots import plot_similarity
    from fullsparse.analysis.similarity import format_similarity, layer_similarity

    device = _setup(args)
    if args.bins < 2:
        raise UserError(f"--bins must be >= 2, got {args.bins}")
    kinds = _names(args.inputs) or []
    if not set(kinds) <= {"natural", "noise"}:
        raise UserError(f"--inputs takes natural and/or noise, got {args.inputs!r}")
    inputs = _inputs(args)
    model = inputs.model.to(device)
    layers = _names(args.layers)
    results = []
    for kind in ("natural", "noise"):
        if kind not in kinds:
            continue
        _log(args, f"similarity: {kind} inputs, {inputs.images.shape[0]} images")
        images = (
            inputs.images
            if kind == "natural"
            else white_noise(inputs.images, inputs.mean, inputs.std, args.seed)
        )
        try:
            results.append(
                layer_similarity(
                    model,
                    images,
                    inputs=kind,
                    bins=args.bins,
                    batch_size=args.batch_size,
                    layers=layers,
                )
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
    table = format_similarity(results)
    return _finish(
        args,
        "similarity",
        "Spatial similarity of conv inputs (paper §6.1, Fig. 4)",
        f"Each layer input X is quantised per image to {args.bins} uniform bins over its "
        "min..max; X = values at the odd columns the fixed mask drops, X' = their kept "
        "even neighbours (width axis, no wrap). Entropies in bits, per image and then "
        "averaged (± = std over images of the difference); 'pooled' = entropies of the "
        "histograms summed over all images (far less small-sample bias: a per-image "
        "256×256 joint histogram from a few hundred pairs underestimates H(X|X')). "
        "Noise = uniform white noise in pixel space, normalised like the data.",
        table,
        {"results": [r.to_dict() for r in results]},
        source=inputs.source,
        plot=lambda png: plot_similarity(results, png, title=_title(inputs.source)),
    )


# --------------------------------------------------------------------------- neighbors
def run_neighbors(args: argparse.Namespace) -> int:
    from fullsparse.analysis.inputs import white_noise
    from fullsparse.analysis.neighbors import (
        default_layers,
        neighbor_maps,
        reconstruction_errors,
        summarize_maps,
    )
    from fullsparse.analysis.plots import plot_neighbors

    device = _setup(args)
    inputs = _inputs(args)
    model = inputs.model.to(device)
    layers = _names(args.layers) or default_layers(model, args.count)
    if not 0 <= args.image_index < inputs.images.shape[0]:
        raise UserError(
            f"--image-index {args.image_index} is outside the {inputs.images.shape[0]} images"
        )
    noise = white_noise(inputs.images, inputs.mean, inputs.std, args.seed)
    panels, errors, maps_json = [], {}, {}
    for kind, images in (("natural", inputs.images), ("noise", noise)):
        _log(args, f"neighbors: {kind} inputs")
        try:
            maps = neighbor_maps(model, images[args.image_index], layers, args.channel)
            errors[kind] = reconstruction_errors(model, images, layers, args.batch_size)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        panels.append((kind, maps))
        maps_json[kind] = summarize_maps(maps)
    lines = [
        "| layer | input C×H×W | channel shown (natural, noise) | natural ‖X−X^r‖/‖X‖ "
        "| noise ‖X−X^r‖/‖X‖ |",
        "|---|---|---|---:|---:|",
    ]
    for i, name in enumerate(layers):
        nat_map, noise_map = panels[0][1][i], panels[1][1][i]
        shape = "×".join(map(str, nat_map.input_shape))
        nat, noi = errors["natural"][name], errors["noise"][name]
        lines.append(
            f"| {name} | {shape} | {nat_map.channel}, {noise_map.channel} | {nat['mean']:.3f} ± "
            f"{nat['std']:.3f} | {noi['mean']:.3f} ± {noi['std']:.3f} |"
        )
    table = "\n".join(lines)
    return _finish(
        args,
        "neighbors",
        "Neighbouring differences (paper §6.2, Fig. 5)",
        f"Figure: image {args.image_index}, per layer the channel shown (largest "
        "variance unless --channel), X, |X^ad| (X^ad[:, i] = X[:, i] − X[:, i+1]) and "
        "X^r (odd columns replaced by their even neighbour), all scaled by X's range. "
        "Table: relative error of X^r over the whole layer input, mean ± std over the "
        "images.",
        table,
        {"errors": errors, "maps": maps_json},
        source=inputs.source,
        plot=lambda png: plot_neighbors(panels, png, title=_title(inputs.source)),
    )


# --------------------------------------------------------------------------- fidelity
def run_fidelity(args: argparse.Namespace) -> int:
    from fullsparse.analysis.fidelity import format_fidelity, grad_fidelity
    from fullsparse.analysis.plots import plot_fidelity

    device = _setup(args)
    recipes = list(RECIPES) if args.recipes == "all" else _names(args.recipes) or []
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise UserError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    modes = _names(args.modes) or []
    bad = [m for m in modes if m not in ("local", "accumulated")]
    if bad:
        raise UserError(f"unknown mode(s) {', '.join(bad)}; choose local and/or accumulated")
    if args.batches < 1 or args.batch_size < 1:
        raise UserError("--batches and --batch-size must be >= 1")
    wanted = args.batches * args.batch_size
    inputs = _inputs(args, wanted)
    if inputs.images.shape[0] < wanted:
        raise UserError(
            f"the {args.split} split has {inputs.images.shape[0]} images, fewer than "
            f"--batches × --batch-size = {wanted}"
        )
    model = inputs.model.to(device)
    batches = [
        (inputs.images[i : i + args.batch_size], inputs.labels[i : i + args.batch_size])
        for i in range(0, wanted, args.batch_size)
    ]
    result = grad_fidelity(
        model,
        batches,
        recipes,
        modes=modes,
        reference=args.reference,
        include_decay=args.include_decay,
        seed=args.seed,
        progress=lambda m: _log(args, f"fidelity: {m}"),
    )
    table = format_fidelity(result)
    ref = (
        "the plain dense model (same weights): the whole effect of a recipe, forward "
        "pruning included"
        if args.reference == "dense"
        else "the exact gradient of the recipe's own sparse forward: the backward "
        "approximations alone"
    )
    return _finish(
        args,
        "fidelity",
        f"Gradient fidelity per layer (reference: {args.reference})",
        f"{len(batches)} batches of {args.batch_size}; cross-entropy loss, train-mode "
        f"BatchNorm. Reference: {ref}. `local`: only that layer uses the recipe; "
        "`accumulated`: every layer sparsify_ selects does (the head stays dense), so "
        "errors of later layers reach earlier ones. grad_input = the layer's own dX "
        "(Eq. 2); grad_weight = dW (Eq. 3)"
        + (" including" if args.include_decay else " without")
        + " the SR-STE decay term. Layers are in forward order: the backward ends at 0.",
        table,
        result.to_dict(),
        source=inputs.source,
        plot=lambda png: plot_fidelity(
            result, png, title=f"{inputs.source['model']}: cosine to the {args.reference} reference"
        ),
        shown=table.split("\n\n**")[0],
        saved=" (per-layer tables)",
    )


# --------------------------------------------------------------------------- overhead
def run_overhead(args: argparse.Namespace) -> int:
    import torch

    from fullsparse.analysis.overhead import format_overhead, measure_overhead
    from fullsparse.models import build_model

    device = _setup(args)
    for flag in ("batch_size", "image_size", "in_channels", "num_classes", "repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    torch.manual_seed(args.seed)
    model = build_model(
        args.model, args.num_classes, in_channels=args.in_channels, image_size=args.image_size
    ).to(device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(
        args.batch_size, args.in_channels, args.image_size, args.image_size, generator=g
    )
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    result = measure_overhead(
        model,
        x,
        y,
        recipe=args.recipe,
        ir_alpha=args.ir_alpha,
        warmup=args.warmup,
        repeats=args.repeats,
        model_name=args.model,
        progress=lambda m: _log(args, f"overhead: {m}"),
    )
    table = format_overhead(result)
    return _finish(
        args,
        "overhead",
        "Extra time per training iteration (paper Tables 2 and 6)",
        "Each operator alone, summed over the sparse layers of one iteration; medians "
        f"over {args.repeats} runs after {args.warmup} warm-up. The masks are magnitude "
        "2:4 selections (mask_2to4); FST's own overhead is S(W) + S(Wᵀ) + shift, the "
        "activation masks below it are what WX/WG/GG/GX would pay instead. Random "
        "inputs (mask costs depend on sizes, not values). The paper column is its "
        "Table 6 / Table 2 (A100, batch 256, ImageNet 224×224): for scale only.",
        table,
        result.to_dict(),
    )


# --------------------------------------------------------------------------- parser
def add_parser(subparsers: Any) -> None:
    from fullsparse.analysis.fidelity import REFERENCES

    parser = subparsers.add_parser("analyze", help=HELP, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="analyze_command", metavar="ANALYSIS", required=True)

    p = sub.add_parser(
        "similarity",
        help="entropy H(X) and H(X|X') of every conv input (paper §6.1, Fig. 4)",
        description="For every conv layer's input: entropy of the values the fixed mask "
        "drops, and their conditional entropy given the kept neighbour, for natural images "
        "and white noise.",
    )
    _add_model_args(p, images=1000)
    p.add_argument("--batch-size", type=int, default=100, help="images per forward")
    p.add_argument("--bins", type=int, default=256, help="quantisation levels (256 = 8 bits)")
    p.add_argument(
        "--inputs",
        default="natural,noise",
        help="natural and/or noise, comma-separated",
    )
    p.add_argument("--layers", default=None, help="comma-separated conv names (default: all)")
    _add_run_args(p, "similarity")
    p.set_defaults(func=run_similarity, _parser=p)

    p = sub.add_parser(
        "neighbors",
        help="images of X, X^ad and X^r for chosen layers (paper §6.2, Fig. 5)",
        description="Feature maps, adjacent-difference maps and pair reconstructions of "
        "chosen conv inputs for one natural and one noise image, plus the reconstruction "
        "error over --images images.",
    )
    _add_model_args(p, images=256)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward")
    p.add_argument("--layers", default=None, help="comma-separated conv names")
    p.add_argument("--count", type=int, default=5, help="layers when --layers is not given")
    p.add_argument("--image-index", type=int, default=0, help="image shown")
    p.add_argument(
        "--channel", type=int, default=None, help="channel shown (default: the largest variance)"
    )
    _add_run_args(p, "neighbors")
    p.set_defaults(func=run_neighbors, _parser=p)

    p = sub.add_parser(
        "fidelity",
        help="per-layer cosine/relative error of each recipe's gradients vs exact",
        description="Cosine similarity and relative error of every recipe's grad_input and "
        "grad_weight against the exact gradient, per layer, with only that layer sparse "
        "(local) and with the whole model sparse (accumulated).",
    )
    _add_model_args(p, images=None, split="train")
    p.add_argument("--recipes", default="all", help="comma-separated recipes or 'all'")
    p.add_argument("--modes", default="local,accumulated", help="local and/or accumulated")
    p.add_argument(
        "--reference",
        choices=REFERENCES,
        metavar="REFERENCE",
        default="dense",
        help="dense: the plain dense model; forward: the exact gradient of the recipe's own "
        "sparse forward (dense)",
    )
    p.add_argument("--batches", type=int, default=2, help="batches averaged over")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument(
        "--include-decay", action="store_true", help="keep the SR-STE decay in grad_weight"
    )
    _add_run_args(p, "fidelity")
    p.set_defaults(func=run_fidelity, _parser=p)

    p = sub.add_parser(
        "overhead",
        help="time of S(W), S(Wᵀ), IR shift and activation masks per iteration (Tables 2, 6)",
        description="Per training iteration of a model: time spent on FST's masks and shift, "
        "and on sorting-based activation masks, against the iteration time.",
    )
    p.add_argument("--model", default="resnet18", help="model")
    p.add_argument("--image-size", type=int, default=32, help="input size")
    p.add_argument("--in-channels", type=int, default=3, help="input channels")
    p.add_argument("--num-classes", type=int, default=10, help="classes")
    p.add_argument("--batch-size", type=int, default=64, help="batch (the paper: 256)")
    p.add_argument(
        "--recipe", choices=RECIPES, metavar="RECIPE", default="fst",
        help="recipe of the timed iteration",
    )  # fmt: skip
    p.add_argument("--ir-alpha", type=float, default=1.0, help="α of the timed shift")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs")
    p.add_argument("--repeats", type=int, default=10, help="timed runs, median")
    p.add_argument("--seed", type=int, default=0, help="init and input seed")
    _add_run_args(p, "overhead", plot=False)
    p.set_defaults(func=run_overhead, _parser=p)
