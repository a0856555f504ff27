"""The run configuration of ``fullsparse train``: one frozen dataclass, validated on build.

A run is described completely by a :class:`TrainConfig`; the run folder gets the resolved
config as ``config.json`` (which ``--config`` reads back). Sources are layered: field
defaults < a config file (``--config run.yaml|run.json``) < command-line flags. Unknown keys
are rejected with the valid names, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fullsparse.config import SparsityConfig, recipe
from fullsparse.errors import ConfigError

__all__ = [
    "TrainConfig",
    "AMP_MODES",
    "DEVICES",
    "SPARSITY_OVERRIDES",
    "load_config_file",
    "config_from_sources",
]

#: ``none``: fp32; ``bf16``: bfloat16 autocast (CPU and CUDA, no scaler needed);
#: ``fp16``: float16 autocast + GradScaler (CUDA only: fp16 needs loss scaling).
AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
#: TrainConfig fields that override the named recipe's SparsityConfig (None = recipe default).
SPARSITY_OVERRIDES = ("ir_alpha", "decay", "grad_input_source", "tsm_interval")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's optimiser (§7.1)
    on the short "main job": ResNet-20, Fashion-MNIST, ``fst``, 2 epochs.

    ``batch_size`` is the *global* batch: under ``torchrun`` with N processes each rank
    gets ``batch_size / N``, so the learning rate and the run's numbers do not depend on N.
    """

    # -- what is trained ------------------------------------------------------------------
    #: A name from ``fullsparse.models.MODELS`` or ``tv:<torchvision name>``.
    model: str = "resnet20"
    #: Extra keyword arguments for ``build_model`` (e.g. a shrunk ViT: ``{"depth": 2}``).
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: A name from ``fullsparse.data.DATASETS``.
    dataset: str = "fashion-mnist"
    #: Where the dataset lives (None: ``$FULLSPARSE_DATA`` and the system locations).
    data_dir: str | None = None
    #: Input resolution (None: the dataset's own).
    image_size: int | None = None
    #: Train on a fixed random subset of this many images (None: all). The default keeps
    #: the no-argument main job to a few minutes on a 2-core CPU; set None for full epochs.
    train_subset: int | None = 10000
    #: Evaluate on the first this-many test images (None: all).
    test_subset: int | None = None
    #: Size of the ``synthetic`` dataset (used only by ``dataset="synthetic"``).
    synthetic_train: int = 512
    synthetic_test: int = 256
    synthetic_classes: int = 10

    # -- sparsity -------------------------------------------------------------------------
    #: A recipe name from ``fullsparse.RECIPES``.
    recipe: str = "fst"
    #: Overrides of the recipe's fields; None keeps the recipe's value.
    ir_alpha: float | None = None
    decay: float | None = None
    grad_input_source: str | None = None
    tsm_interval: int | None = None

    # -- optimisation (paper §7.1) --------------------------------------------------------
    epochs: int = 2
    #: Global batch size (all ranks together).
    batch_size: int = 128
    #: Peak learning rate; None = 0.1 × batch_size / 256 (the linear scaling the paper uses).
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 7e-5
    #: No weight decay on 1-D parameters (BatchNorm/LayerNorm scales and shifts, biases).
    no_wd_bn_bias: bool = False
    label_smoothing: float = 0.1
    #: Linear warm-up length in epochs (fractions allowed) before the cosine decay to 0.
    warmup_epochs: float = 0.0
    seed: int = 0
    #: DataLoader worker processes (0: load in the training process).
    workers: int = 0

    # -- execution ------------------------------------------------------------------------
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    #: Under DDP, replace BatchNorm by SyncBatchNorm (global-batch statistics).
    sync_bn: bool = False
    #: ``torch.use_deterministic_algorithms(True)`` + seeding: reruns and resumes are
    #: bit-identical on CPU with the same thread count (float sums depend on it), and on
    #: CUDA where every op has a deterministic kernel.
    deterministic: bool = False
    #: On a NaN/Inf loss skip the step (and count it) instead of stopping the run.
    skip_nonfinite: bool = False

    # -- run folder -----------------------------------------------------------------------
    #: Run folder (None: ``runs/<dataset>-<model>-<recipe>-seed<seed>``).
    out: str | None = None
    #: Continue from ``<out>/last.pt`` (True) or from the checkpoint at this path.
    resume: bool | str = False
    #: Replace the results of an existing run folder.
    force: bool = False
    #: End this invocation after this epoch (the schedule still spans ``epochs``); resume
    #: later with ``resume=True`` — for time-limited jobs.
    stop_after: int | None = None
    #: Show a progress bar on stderr.
    progress: bool = True
    #: Print nothing on stdout (the run folder's ``train.log`` still gets everything).
    quiet: bool = False
    #: Write ``curves.png`` when matplotlib is installed.
    plot: bool = True

    def __post_init__(self) -> None:
        problems = [p for p in (_check(name, getattr(self, name)) for name in _SPEC) if p]
        if problems:
            raise ConfigError("; ".join(problems))
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} is not one of {', '.join(DEVICES)}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp={self.amp!r} is not one of {', '.join(AMP_MODES)}")
        if self.stop_after is not None and self.stop_after > self.epochs:
            raise ConfigError(
                f"stop_after={self.stop_after} clashes with epochs={self.epochs}: "
                "it must be at most the number of epochs"
            )
        if self.resume and self.force:
            raise ConfigError(
                "resume and force clash: resume continues the run folder, force replaces it"
            )
        if self.warmup_epochs > self.epochs:
            raise ConfigError(
                f"warmup_epochs={self.warmup_epochs} clashes with epochs={self.epochs}: "
                "warm-up must fit in the run"
            )
        self.sparsity()  # an unknown recipe or a clashing override fails here, early

    # -- derived values -------------------------------------------------------------------
    def sparsity(self) -> SparsityConfig:
        """The recipe's frozen SparsityConfig with this config's overrides applied."""
        overrides = {k: getattr(self, k) for k in SPARSITY_OVERRIDES}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        try:
            return recipe(self.recipe, **overrides)
        except ValueError as exc:
            raise ConfigError(f"recipe {self.recipe!r}: {exc}") from None

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else 0.1 * self.batch_size / 256

    @property
    def run_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path("runs") / f"{self.dataset}-{self.model}-{self.recipe}-seed{self.seed}".replace(
            ":", "_"
        )

    # -- conversions ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        _reject_unknown(changes, "TrainConfig")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; ``-`` in keys is read as ``_``; unknown keys are an error."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"{source} must be a mapping of field: value, got {type(values).__name__}"
            )
        normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
        _reject_unknown(normalised, source)
        return cls(**normalised)


# ---------------------------------------------------------------------------------------
# Validation: each field's kind. A table keeps the checks in one place and the messages
# uniform ("epochs must be an integer >= 1, got 'two'").

_INT, _FLOAT, _BOOL, _STR = "int", "float", "bool", "str"
_SPEC: dict[str, tuple[str, bool, float | None]] = {
    # name: (kind, optional, minimum)
    "model": (_STR, False, None),
    "model_kwargs": ("dict", False, None),
    "dataset": (_STR, False, None),
    "data_dir": (_STR, True, None),
    "image_size": (_INT, True, 1),
    "train_subset": (_INT, True, 1),
    "test_subset": (_INT, True, 1),
    "synthetic_train": (_INT, False, 1),
    "synthetic_test": (_INT, False, 1),
    "synthetic_classes": (_INT, False, 2),
    "recipe": (_STR, False, None),
    "ir_alpha": (_FLOAT, True, 0),
    "decay": (_FLOAT, True, 0),
    "grad_input_source": (_STR, True, None),
    "tsm_interval": (_INT, True, 1),
    "epochs": (_INT, False, 1),
    "batch_size": (_INT, False, 1),
    "lr": (_FLOAT, True, 0),
    "momentum": (_FLOAT, False, 0),
    "weight_decay": (_FLOAT, False, 0),
    "no_wd_bn_bias": (_BOOL, False, None),
    "label_smoothing": (_FLOAT, False, 0),
    "warmup_epochs": (_FLOAT, False, 0),
    "seed": (_INT, False, 0),
    "workers": (_INT, False, 0),
    "device": (_STR, False, None),
    "amp": (_STR, False, None),
    "channels_last": (_BOOL, False, None),
    "compile": (_BOOL, False, None),
    "sync_bn": (_BOOL, False, None),
    "deterministic": (_BOOL, False, None),
    "skip_nonfinite": (_BOOL, False, None),
    "out": (_STR, True, None),
    "resume": ("bool_or_str", False, None),
    "force": (_BOOL, False, None),
    "stop_after": (_INT, True, 1),
    "progress": (_BOOL, False, None),
    "quiet": (_BOOL, False, None),
    "plot": (_BOOL, False, None),
}
_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
assert set(_SPEC) == set(_FIELDS), "every TrainConfig field needs a validation entry"


def _check(name: str, value: Any) -> str | None:
    kind, optional, minimum = _SPEC[name]
    if value is None:
        return None if optional else f"{name} must be set, got null"
    if kind == _BOOL:
        ok = isinstance(value, bool)
        want = "true or false"
    elif kind == _INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif kind == _FLOAT:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        want = "a finite number"
    elif kind == _STR:
        ok = isinstance(value, str) and value != ""
        want = "a non-empty string"
    elif kind == "dict":
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        want = "a mapping of keyword: value"
    else:  # bool_or_str
        ok = isinstance(value, bool) or (isinstance(value, str) and value != "")
        want = "true, false or a checkpoint path"
    if ok and minimum is not None and value < minimum:
        ok = False
        want = f"{want} >= {minimum:g}"
    elif not ok and minimum is not None:
        want = f"{want} >= {minimum:g}"
    return None if ok else f"{name} must be {want}, got {value!r}"


def _reject_unknown(values: dict[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(_FIELDS))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, _FIELDS, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    raise ConfigError(
        f"unknown key(s) in {source}: {', '.join(hints)}; valid keys: {', '.join(_FIELDS)}"
    )


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.json`` or ``.yaml``/``.yml`` run config into a dict (not yet validated).

    YAML needs PyYAML, imported only here; every problem is one ConfigError line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"reading {path} needs PyYAML: pip install pyyaml (or use a .json config)"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
        if data is None:
            data = {}
    else:
        raise ConfigError(f"config file {path} must end in .json, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of field: value, got {type(data).__name__}"
        )
    return data


def config_from_sources(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults < ``config_file`` < ``overrides`` (the flags given on the command line)."""
    values: dict[str, Any] = {}
    source = "config"
    if config_file is not None:
        values.update(
            {str(k).replace("-", "_"): v for k, v in load_config_file(config_file).items()}
        )
        source = f"config file {config_file}"
        _reject_unknown(values, source)
    values.update(overrides or {})
    return TrainConfig.from_dict(values, source=source)
