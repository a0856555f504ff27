"""The run configuration of ``fullsparse train``: one frozen dataclass, validated on build.

A run is described completely by a :class:`TrainConfig`; the run folder gets the resolved
config as ``config.json`` (which ``--config`` reads back). Sources are layered: field
defaults < a config file (``--config run.yaml|run.json``) < command-line flags. Unknown keys
are rejected with the valid names, so a typo never silently falls back to a default.

Three tasks share the one config: ``classify`` (images, the paper's setting), ``lm`` (a
byte-level causal language model) and ``detection`` (torchvision object detectors).
Fields whose sensible value depends on the task (model, dataset, optimiser, weight decay,
...) default to None and are filled with the task's value when the config is built, so a
built config — and ``config.json`` — always holds the values the run used.
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
    "TASKS",
    "OPTIMIZERS",
    "LM_DATASETS",
    "DETECTION_DATASETS",
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
SPARSITY_OVERRIDES = ("ir_alpha", "decay", "grad_input_source", "tsm_interval", "conv_layout")
TASKS = ("classify", "lm", "detection")
OPTIMIZERS = ("sgd", "adamw")
#: Text corpora of the ``lm`` task: ``pystdlib`` is the running Python's standard library
#: (present on every machine), ``text`` a folder of .py/.txt/.md/.rst files (``data_dir``).
LM_DATASETS = ("pystdlib", "text")
#: Datasets of the ``detection`` task: generated shapes, or COCO / VOC folders (``data_dir``).
#: The same names as :data:`fullsparse.data.detection.DETECTION_DATASETS` (checked there).
DETECTION_DATASETS = ("synthetic-det", "coco", "voc")
#: AdamW's default peak lr: the usual for small transformers (nanoGPT's char models use
#: 1e-3 at 10M parameters; smaller models take a larger one). Detection uses it too: on
#: fcos_tiny from scratch 1e-3 learned several times slower (docs/detection.md).
ADAMW_LR = 3e-3
#: Detection defaults (AdamW): decoupled weight decay and a clip that only catches the
#: rare early spike of a from-scratch detector's box loss.
DETECTION_WEIGHT_DECAY = 0.05
DETECTION_GRAD_CLIP = 10.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's optimiser (§7.1)
    on the short "main job": ResNet-20, Fashion-MNIST, ``fst``, 2 epochs.

    ``batch_size`` is the *global* batch: under ``torchrun`` with N processes each rank
    gets ``batch_size / N``, so the learning rate and the run's numbers do not depend on N.
    """

    # -- what is trained ------------------------------------------------------------------
    #: ``classify`` (images -> class), ``lm`` (bytes -> next byte) or ``detection``
    #: (images -> boxes). The None-defaults below are filled from this (``_task_defaults``).
    task: str = "classify"
    #: classify: a name from ``fullsparse.models.MODELS`` or ``tv:<torchvision name>``;
    #: lm: one of ``fullsparse.models.LM_MODELS``; detection: one of
    #: ``fullsparse.models.detection.DETECTION_MODELS``. None: ``resnet20`` / ``gpt_tiny`` /
    #: ``fcos_tiny``.
    model: str | None = None
    #: Extra keyword arguments for the model builder (e.g. a shrunk ViT: ``{"depth": 2}``;
    #: a GPT's ``context``, ``depth``, ``embed_dim``, ``num_heads``).
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: classify: a name from ``fullsparse.data.DATASETS``; lm: one of ``LM_DATASETS``;
    #: detection: one of ``DETECTION_DATASETS``. None: ``fashion-mnist`` / ``pystdlib``
    #: (``text`` when ``data_dir`` is given) / ``synthetic-det``.
    dataset: str | None = None
    #: Where the dataset lives (None: ``$FULLSPARSE_DATA`` and the system locations); for
    #: the lm ``text`` dataset, the folder of text files.
    data_dir: str | None = None
    #: Input resolution (None: the dataset's own). Detection: the detector's resize side
    #: (min = max size; SSD: a fixed square) and the synthetic-det image side (None: 128
    #: for synthetic-det, the detector's default for coco/voc).
    image_size: int | None = None
    #: Train on a fixed random subset of this many images (None: all). The default keeps
    #: the no-argument main job to a few minutes on a 2-core CPU; set None for full epochs.
    train_subset: int | None = 10000
    #: Evaluate on the first this-many test images — for lm, the first this-many
    #: non-overlapping validation windows of ``context`` bytes (None: all).
    test_subset: int | None = None
    #: Size of the ``synthetic`` / ``synthetic-det`` datasets (used only by them).
    synthetic_train: int = 512
    synthetic_test: int = 256
    #: None: 10 for classify, 3 shape classes for detection (at most 5).
    synthetic_classes: int | None = None
    #: lm: bytes of the corpus read for training / validation (whole files in a fixed order,
    #: the last one cut; see ``fullsparse.data.text``). Caps keep the corpus in memory small.
    text_train_bytes: int = 4_000_000
    text_val_bytes: int = 400_000

    # -- sparsity -------------------------------------------------------------------------
    #: A recipe name from ``fullsparse.RECIPES``.
    recipe: str = "fst"
    #: Overrides of the recipe's fields; None keeps the recipe's value.
    ir_alpha: float | None = None
    decay: float | None = None
    grad_input_source: str | None = None
    tsm_interval: int | None = None
    conv_layout: str | None = None

    # -- optimisation (classify: paper §7.1; lm: the usual AdamW recipe of small GPTs) ------
    #: ``sgd`` (with momentum, the paper's) or ``adamw`` (the standard for transformers).
    #: None: sgd for classify, adamw for lm.
    optimizer: str | None = None
    epochs: int = 2
    #: lm only: optimizer steps per epoch. An lm "epoch" is a fixed number of random
    #: windows, so a run's length does not depend on the corpus size; each epoch ends with a
    #: validation pass and a checkpoint. None: 200 for lm; a classify epoch is one pass over
    #: the training images, so there it must stay None.
    steps_per_epoch: int | None = None
    #: Global batch size (all ranks together); lm: sequences of ``context`` bytes.
    batch_size: int = 128
    #: Peak learning rate; None = 0.1 × batch_size / 256 for SGD (the linear scaling the
    #: paper uses), ``ADAMW_LR`` for AdamW.
    lr: float | None = None
    #: SGD momentum, or AdamW's β1 (β2 is 0.95, GPT-3's: steadier on short runs than 0.999).
    momentum: float = 0.9
    #: None: 7e-5 for classify (the paper's), 0.1 for lm (decoupled AdamW decay, GPT-2's).
    weight_decay: float | None = None
    #: No weight decay on 1-D parameters (BatchNorm/LayerNorm scales and shifts, biases).
    #: None: off for classify (the paper decays everything), on for lm (GPT practice).
    no_wd_bn_bias: bool | None = None
    #: None: 0.1 for classify (the paper's); 0 for lm, whose train loss should be the same
    #: cross-entropy as the validation loss that perplexity is computed from.
    label_smoothing: float | None = None
    #: Linear warm-up length in epochs (fractions allowed) before the cosine decay to 0.
    #: None: 0 for classify; 10 % of the run for lm (Adam's early steps are noisy).
    warmup_epochs: float | None = None
    #: Clip the global gradient norm to this before each step (0: no clipping). None: 0 for
    #: classify, 1.0 for lm (attention logits can spike early in training).
    grad_clip: float | None = None
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
    #: On a NaN/Inf loss or gradient skip the step (and count it) instead of stopping.
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
    #: Also write ``last.pt`` every this many steps inside an epoch (0: at epoch ends
    #: only), so a run killed mid-epoch loses at most that many steps; resuming from such a
    #: checkpoint continues at the next step, bit-exactly with ``deterministic``. classify.
    checkpoint_every: int = 0
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
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {', '.join(TASKS)}")
        for name, value in _task_defaults(self).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: filled once, at build
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        _check_task_fields(self)
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
        if self.lr is not None:
            return self.lr
        return ADAMW_LR if self.optimizer == "adamw" else 0.1 * self.batch_size / 256

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
    "task": (_STR, False, None),
    "model": (_STR, True, None),
    "model_kwargs": ("dict", False, None),
    "dataset": (_STR, True, None),
    "data_dir": (_STR, True, None),
    "image_size": (_INT, True, 1),
    "train_subset": (_INT, True, 1),
    "test_subset": (_INT, True, 1),
    "synthetic_train": (_INT, False, 1),
    "synthetic_test": (_INT, False, 1),
    "synthetic_classes": (_INT, True, 1),
    "text_train_bytes": (_INT, False, 2),
    "text_val_bytes": (_INT, False, 2),
    "recipe": (_STR, False, None),
    "ir_alpha": (_FLOAT, True, 0),
    "decay": (_FLOAT, True, 0),
    "grad_input_source": (_STR, True, None),
    "tsm_interval": (_INT, True, 1),
    "conv_layout": (_STR, True, None),
    "optimizer": (_STR, True, None),
    "epochs": (_INT, False, 1),
    "steps_per_epoch": (_INT, True, 1),
    "batch_size": (_INT, False, 1),
    "lr": (_FLOAT, True, 0),
    "momentum": (_FLOAT, False, 0),
    "weight_decay": (_FLOAT, True, 0),
    "no_wd_bn_bias": (_BOOL, True, None),
    "label_smoothing": (_FLOAT, True, 0),
    "warmup_epochs": (_FLOAT, True, 0),
    "grad_clip": (_FLOAT, True, 0),
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
    "checkpoint_every": (_INT, False, 0),
    "progress": (_BOOL, False, None),
    "quiet": (_BOOL, False, None),
    "plot": (_BOOL, False, None),
}
_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
assert set(_SPEC) == set(_FIELDS), "every TrainConfig field needs a validation entry"


def _task_defaults(config: TrainConfig) -> dict[str, Any]:
    """The values the None-defaults of ``config`` take for its task."""
    if config.task == "detection":
        dataset = config.dataset or "synthetic-det"
        return {
            "model": "fcos_tiny",
            "dataset": dataset,
            "image_size": 128 if dataset == "synthetic-det" else None,
            "synthetic_classes": 3,
            "optimizer": "adamw",
            "weight_decay": DETECTION_WEIGHT_DECAY,
            "no_wd_bn_bias": True,
            "label_smoothing": 0.0,
            "warmup_epochs": min(1.0, 0.1 * config.epochs),
            "grad_clip": DETECTION_GRAD_CLIP,
        }
    if config.task == "lm":
        return {
            "model": "gpt_tiny",
            "dataset": "text" if config.data_dir is not None else "pystdlib",
            "synthetic_classes": 10,  # unused by lm; the value classify configs record
            "optimizer": "adamw",
            "steps_per_epoch": 200,
            "weight_decay": 0.1,
            "no_wd_bn_bias": True,
            "label_smoothing": 0.0,
            "warmup_epochs": 0.1 * config.epochs,
            "grad_clip": 1.0,
        }
    return {
        "model": "resnet20",
        "dataset": "fashion-mnist",
        "synthetic_classes": 10,
        "optimizer": "sgd",
        "weight_decay": 7e-5,
        "no_wd_bn_bias": False,
        "label_smoothing": 0.1,
        "warmup_epochs": 0.0,
        "grad_clip": 0.0,
    }


def _check_task_fields(config: TrainConfig) -> None:
    """Model, dataset and steps_per_epoch must fit the task (one line naming the clash)."""
    from fullsparse.models import LM_MODELS, MODELS

    model, dataset = config.model, config.dataset
    if config.checkpoint_every and config.task != "classify":
        raise ConfigError(
            f"checkpoint_every={config.checkpoint_every} is for task='classify'; task="
            f"{config.task!r} checkpoints at epoch ends (choose shorter epochs with "
            "steps_per_epoch)"
        )
    if config.task == "detection":
        _check_detection_fields(config)
        return
    if config.task == "lm":
        if model not in LM_MODELS:
            kind = (
                "an image classifier"
                if model in MODELS or str(model).startswith("tv:")
                else "not a known model"
            )
            raise ConfigError(
                f"task='lm' clashes with model={model!r} ({kind}); language models: "
                f"{', '.join(LM_MODELS)}"
            )
        if dataset not in LM_DATASETS:
            raise ConfigError(
                f"task='lm' clashes with dataset={dataset!r}; text corpora: "
                f"{', '.join(LM_DATASETS)} (text = the folder given as data_dir)"
            )
        if dataset == "text" and config.data_dir is None:
            raise ConfigError("dataset='text' needs data_dir: a folder of .py/.txt/.md/.rst files")
        if dataset == "pystdlib" and config.data_dir is not None:
            raise ConfigError(
                f"dataset='pystdlib' clashes with data_dir={config.data_dir!r}: pystdlib is "
                "the running Python's standard library; for a folder use dataset='text' "
                "(the lm default when data_dir is given)"
            )
        return
    from fullsparse.models.detection import DETECTION_MODELS

    if model in DETECTION_MODELS or dataset in DETECTION_DATASETS:
        what = f"model={model!r}" if model in DETECTION_MODELS else f"dataset={dataset!r}"
        raise ConfigError(
            f"{what} is for object detection: it needs task='detection' (--task detection), "
            f"not task={config.task!r}"
        )
    if config.synthetic_classes < 2:
        raise ConfigError(
            f"synthetic_classes must be >= 2 for task={config.task!r}, "
            f"got {config.synthetic_classes}"
        )
    if model in LM_MODELS:
        raise ConfigError(
            f"model={model!r} is a language model: it needs task='lm' (--task lm), "
            f"not task={config.task!r}"
        )
    if dataset in LM_DATASETS:
        raise ConfigError(
            f"dataset={dataset!r} is a text corpus: it needs task='lm' (--task lm), "
            f"not task={config.task!r}"
        )
    if config.steps_per_epoch is not None:
        raise ConfigError(
            f"steps_per_epoch={config.steps_per_epoch} clashes with task={config.task!r}: a "
            "classify epoch is one pass over the training images (use train_subset)"
        )


def _check_detection_fields(config: TrainConfig) -> None:
    """task='detection': a detector, a detection dataset, and no flag it does not support."""
    from fullsparse.models.detection import DETECTION_MODELS, SSD_MIN_SIZE

    if config.model not in DETECTION_MODELS:
        raise ConfigError(
            f"task='detection' clashes with model={config.model!r}; detectors: "
            f"{', '.join(DETECTION_MODELS)}"
        )
    if config.dataset not in DETECTION_DATASETS:
        raise ConfigError(
            f"task='detection' clashes with dataset={config.dataset!r}; detection datasets: "
            f"{', '.join(DETECTION_DATASETS)} (coco and voc read data_dir)"
        )
    if config.dataset == "synthetic-det" and config.data_dir is not None:
        raise ConfigError(
            f"dataset='synthetic-det' clashes with data_dir={config.data_dir!r}: it is "
            "generated; for a folder use dataset='coco' or 'voc'"
        )
    if config.synthetic_classes > 5:
        raise ConfigError(
            f"synthetic_classes={config.synthetic_classes} clashes with task='detection': "
            "synthetic-det has 5 shape classes at most"
        )
    if config.steps_per_epoch is not None:
        raise ConfigError(
            f"steps_per_epoch={config.steps_per_epoch} clashes with task='detection': an "
            "epoch is one pass over the training images (use train_subset)"
        )
    if config.label_smoothing:
        raise ConfigError(
            f"label_smoothing={config.label_smoothing} clashes with task='detection': the "
            "detectors' losses take none"
        )
    if config.model == "ssd300_vgg16" and (config.image_size or 300) < SSD_MIN_SIZE:
        raise ConfigError(
            f"image_size={config.image_size} clashes with model='ssd300_vgg16': it needs "
            f">= {SSD_MIN_SIZE} pixels"
        )
    unsupported = [
        flag
        for flag, on in (
            ("amp", config.amp != "none"),
            ("channels_last", config.channels_last),
            ("compile", config.compile),
            ("sync_bn", config.sync_bn),
        )
        if on
    ]
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)} clash(es) with task='detection': not supported for "
            "detectors yet (they run in fp32, eagerly)"
        )


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
