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
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fullsparse.config import (
    CONV_LAYOUT,
    CONV_SAMPLE_UNIT,
    DECAY_KIND,
    GRAD_INPUT_SOURCE,
    GRAD_WEIGHT_MODE,
    OUTPUT_WEIGHT,
    SparsityConfig,
)
from fullsparse.errors import ConfigError
from fullsparse.kernels.dispatch import BACKENDS
from fullsparse.limits import check_config_ranges
from fullsparse.recipes import RECIPES, recipe
from fullsparse.train.config_checks import (
    DETECTION_DATASETS,
    LM_DATASETS,
    check_task_fields,
    task_defaults,
)
from fullsparse.train.config_file import load_config_file
from fullsparse.train.schedule import DENSE_FINISH_MODES, check_schedule_fields
from fullsparse.train.trackers import REPORTERS, parse_report_to

__all__ = [
    "TrainConfig",
    "TASKS",
    "OPTIMIZERS",
    "LM_DATASETS",
    "DETECTION_DATASETS",
    "AMP_MODES",
    "DEVICES",
    "LOG_LEVELS",
    "REPORTERS",
    "SPARSITY_OVERRIDES",
    "load_config_file",
    "config_from_sources",
    "option",
]

#: ``none``: fp32; ``bf16``: bfloat16 autocast (CPU and CUDA, no scaler needed);
#: ``fp16``: float16 autocast + GradScaler (CUDA only: fp16 needs loss scaling).
AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
#: ``--log-level``: the console's and train.log's (Python logging levels).
LOG_LEVELS = ("debug", "info", "warning", "error")
#: TrainConfig fields that override the named recipe's SparsityConfig (None = recipe default).
SPARSITY_OVERRIDES: tuple[str, ...] = ("ir_alpha", "decay", "grad_input_source", "tsm_interval")
SPARSITY_OVERRIDES += ("conv_layout", "decay_kind", "output_weight", "grad_weight_mode")
SPARSITY_OVERRIDES += ("grad_weight_mode_linear", "ir_alpha_linear", "mask_interval")
SPARSITY_OVERRIDES += ("variance_budget", "variance_interval", "sample_group", "sample_share")
SPARSITY_OVERRIDES += ("conv_sample_unit",)
TASKS = ("classify", "lm", "detection", "custom")
OPTIMIZERS = ("sgd", "adamw")
#: AdamW's default peak lr: the usual for small transformers (nanoGPT's char models use
#: 1e-3 at 10M parameters; smaller models take a larger one). Detection uses it too: on
#: fcos_tiny from scratch 1e-3 learned several times slower (docs/detection.md).
ADAMW_LR = 3e-3


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    cli: str | None = None,
) -> Any:
    """A TrainConfig field with what the command line and the validation need to know.

    ``help``: the flag's help (the default is appended from the field, or for fields the
    task fills, from the task defaults, unless the text already says it; ``{MODELS}`` and
    the other names of ``fullsparse.commands.train.NAME_LISTS`` are replaced by the
    tuple's names, for fields that also take free names); ``minimum``: the
    smallest valid value; ``choices``: the canonical tuple of the values a name field takes
    (the flag's ``choices`` and the list its help shows are read from it, never retyped);
    ``cli``: ``"optional:<const>"`` (the flag's value may be left out: ``--amp`` means
    ``--amp bf16``) or ``"append"`` (the flag may be repeated; the config joins its values
    with commas). A bool field named ``no_<x>`` gets the pair ``--no-<x>`` / ``--<x>``.
    The value's kind (int, float, ...) and whether it may be None come from the field's
    type.
    """
    metadata = {"help": help, "minimum": minimum, "choices": choices, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's optimiser (§7.1)
    on the short "main job": ResNet-20, Fashion-MNIST, ``fst``, 2 epochs.

    ``batch_size`` is the *global* batch: under ``torchrun`` with N processes each rank
    gets ``batch_size / N``, so the learning rate and the run's numbers do not depend on N.
    """

    # -- what is trained ------------------------------------------------------------------
    #: ``classify`` (images -> class), ``lm`` (bytes -> next byte), ``detection``
    #: (images -> boxes) or ``custom`` (a user's model, data and loss:
    #: ``train(config, task=UserTask(...))``, :mod:`fullsparse.train.custom`; ``model`` and
    #: ``dataset`` are then names for the run folder and the checkpoints). The None-defaults
    #: below are filled from this (``task_defaults``).
    task: str = option(
        "classify",
        "what is trained: classify = images, lm = a byte-level language model, detection = "
        "torchvision detectors (the vision extra), custom = your model and data (from Python)",
        choices=TASKS,
    )
    #: classify: a name from ``fullsparse.models.MODELS``, ``tv:<torchvision name>`` or
    #: ``timm:<timm name>``;
    #: lm: one of ``fullsparse.models.LM_MODELS``; detection: one of
    #: ``fullsparse.models.detection.DETECTION_MODELS``. None: ``resnet20`` / ``gpt_tiny`` /
    #: ``fcos_tiny``.
    model: str | None = option(
        None,
        "classify: {MODELS}, tv:<torchvision name> or timm:<timm name>; lm: {LM_MODELS}; "
        "detection: {DETECTION_MODELS}",
    )
    #: Extra keyword arguments for the model builder (e.g. a shrunk ViT: ``{"depth": 2}``;
    #: a GPT's ``context``, ``depth``, ``embed_dim``, ``num_heads``).
    model_kwargs: dict[str, Any] = option(
        help='extra model options as JSON, e.g. \'{"depth": 2}\' or, for gpt_tiny, \'{"context": '
        '128, "depth": 4, "embed_dim": 128, "num_heads": 4}\'',
        factory=dict,
    )
    #: classify: a name from ``fullsparse.data.DATASETS``; lm: one of ``LM_DATASETS``;
    #: detection: one of ``DETECTION_DATASETS``. None: ``fashion-mnist`` / ``pystdlib``
    #: (``text`` when ``data_dir`` is given) / ``synthetic-det``.
    dataset: str | None = option(
        None,
        "classify: {DATASETS}; lm: {LM_DATASETS} (pystdlib: Python's standard library, "
        "text: the --data-dir folder); detection: {DETECTION_DATASETS} (synthetic-det: "
        "generated shapes)",
    )
    #: Where the dataset lives (None: ``$FULLSPARSE_DATA`` and the system locations); for
    #: the lm ``text`` dataset, the folder of text files.
    data_dir: str | None = option(
        None,
        "dataset folder (default: $FULLSPARSE_DATA, system locations); lm: a folder of "
        ".py/.txt/.md/.rst files",
    )
    #: Input resolution (None: the dataset's own). Detection: the detector's resize side
    #: (min = max size; SSD: a fixed square) and the synthetic-det image side (None: 128
    #: for synthetic-det, the detector's default for coco/voc).
    image_size: int | None = option(
        None,
        "input resolution (default: the dataset's; detection: the detector's resize side, "
        "128 for synthetic-det)",
        minimum=1,
    )
    #: Train on a fixed random subset of this many images (None: all). The default keeps
    #: the no-argument main job to a few minutes on a 2-core CPU; set None for full epochs.
    train_subset: int | None = option(
        10000, "train on a fixed random subset of N images ('all' for full epochs)", minimum=1
    )
    #: Evaluate on the first this-many test images — for lm, the first this-many
    #: non-overlapping validation windows of ``context`` bytes (None: all).
    test_subset: int | None = option(
        None,
        "evaluate on the first N test images, lm: validation windows (default: all)",
        minimum=1,
    )
    #: Size of the ``synthetic`` / ``synthetic-det`` datasets (used only by them).
    synthetic_train: int = option(512, "synthetic dataset: train images", minimum=1)
    synthetic_test: int = option(256, "synthetic dataset: test images", minimum=1)
    #: None: 10 for classify, 3 shape classes for detection (at most 5).
    synthetic_classes: int | None = option(
        None, "synthetic dataset: classes (synthetic-det: 1-5 shapes)", minimum=1
    )
    #: lm: bytes of the corpus read for training / validation (whole files in a fixed order,
    #: the last one cut; see ``fullsparse.data.text``). Caps keep the corpus in memory small.
    text_train_bytes: int = option(4_000_000, "lm: bytes of training text read", minimum=2)
    text_val_bytes: int = option(400_000, "lm: bytes of validation text read", minimum=2)

    # -- sparsity -------------------------------------------------------------------------
    #: A recipe name from ``fullsparse.RECIPES``.
    recipe: str = option("fst", "sparsity recipe (fullsparse.RECIPES)", choices=RECIPES)
    # -- ASP (fullsparse.train.asp): the trained dense model that recipe asp prunes once
    init_from: str | None = option(None, "asp: dense run folder or checkpoint to prune, fine-tune")
    #: Overrides of the recipe's fields; None keeps the recipe's value.
    ir_alpha: float | None = option(
        None, "override: information-restoration strength α (default: the recipe's)", minimum=0
    )
    decay: float | None = option(
        None, "override: SR-STE decay λ (default: the recipe's)", minimum=0
    )
    grad_input_source: str | None = option(
        None,
        "override: source of the backward mask (default: the recipe's)",
        choices=GRAD_INPUT_SOURCE,
    )
    tsm_interval: int | None = option(
        None, "override: steps between TSM mask recomputations (default: the recipe's)", minimum=1
    )
    conv_layout: str | None = option(
        None,
        "override: grouping of conv weights for 2:4 (default: the recipe's)",
        choices=CONV_LAYOUT,
    )
    # decay and forward variants (None: the recipe's)
    decay_kind: str | None = option(
        None, "override: where λ enters (default: the recipe's)", choices=DECAY_KIND
    )
    output_weight: str | None = option(
        None, "override: the forward weight (default: the recipe's)", choices=OUTPUT_WEIGHT
    )
    grad_weight_mode: str | None = option(
        None, "override: the weight gradient (default: the recipe's)", choices=GRAD_WEIGHT_MODE
    )
    grad_weight_mode_linear: str | None = option(
        None,
        "override: Linear layers' grad_weight mode (default: --grad-weight-mode)",
        choices=GRAD_WEIGHT_MODE,
    )
    ir_alpha_linear: float | None = option(None, "override: Linear layers' IR α", minimum=0)
    # is_adaptive (fst_adaptive): the variance budget of the sampled weight gradient
    variance_budget: float | None = option(
        None,
        "override: is_adaptive's largest sampling/minibatch variance ratio (default: the "
        "recipe's, 0.2)",
    )
    variance_interval: int | None = option(
        None,
        "override: is_adaptive's calls between variance measurements (default: the recipe's, 50)",
        minimum=1,
    )
    sample_group: int | None = option(
        None,
        "override: units per sampling group of is_half / is_adaptive, a multiple of 4, or 0 "
        "for one group per call (the whole batch) (default: the recipe's, 4)",
        minimum=0,
    )
    sample_share: float | None = option(
        None, "override: the share of every group is_half keeps (default: the recipe's, 0.5)"
    )
    conv_sample_unit: str | None = option(
        None,
        "override: what a conv's is_half / is_adaptive sample: block (a sample's even or odd "
        "output columns) or sample (whole samples, one product) (default: the recipe's, block)",
        choices=CONV_SAMPLE_UNIT,
    )
    keep_dense: str | None = option(None, "layers kept dense: stem, first_linear or both (a,b)")
    # -- schedules over the run (fullsparse.train.schedule) --------------------------------
    #: Steps between recomputations of the S_K / S_Co weight masks (None: the recipe's, 1).
    mask_interval: int | None = option(
        None, "steps between weight-mask updates (default: the recipe's, 1)", minimum=1
    )
    dense_warmup_steps: int = option(0, "first N steps with every GEMM dense", minimum=0)
    #: The last fraction of the steps trains with dense GEMMs (``dense_finish_mode``).
    dense_finish: float = option(0.0, "last fraction of the steps dense (0 = off)", minimum=0)
    dense_finish_mode: str = option(
        "backward",
        "what the dense finish makes dense: backward (the forward stays 2:4) or all",
        choices=DENSE_FINISH_MODES,
    )

    # -- optimisation (classify: paper §7.1; lm: the usual AdamW recipe of small GPTs) ------
    #: ``sgd`` (with momentum, the paper's) or ``adamw`` (the standard for transformers).
    #: None: sgd for classify, adamw for lm.
    optimizer: str | None = option(None, "optimizer", choices=OPTIMIZERS)
    epochs: int = option(2, "epochs", minimum=1)
    #: lm only: optimizer steps per epoch. An lm "epoch" is a fixed number of random
    #: windows, so a run's length does not depend on the corpus size; each epoch ends with a
    #: validation pass and a checkpoint. None: 200 for lm; a classify epoch is one pass over
    #: the training images, so there it must stay None.
    steps_per_epoch: int | None = option(None, "lm: optimizer steps per epoch", minimum=1)
    #: Global batch size (all ranks together); lm: sequences of ``context`` bytes.
    batch_size: int = option(
        128, "global batch size over all processes (lm: sequences of context bytes)", minimum=1
    )
    #: Gradient accumulation: each optimizer step runs ``batch_size`` as this many equal
    #: micro-batches (forward and backward each), so it takes 1/N of the activation memory.
    #: The step, its lr, its masks and its decay are those of the whole batch.
    grad_accum_steps: int = option(
        1, "micro-batches per optimizer step; --batch-size stays the batch per step", minimum=1
    )
    #: Peak learning rate; None = 0.1 × batch_size / 256 for SGD (the linear scaling the
    #: paper uses), ``ADAMW_LR`` for AdamW.
    lr: float | None = option(None, "peak lr (default: sgd 0.1 x batch/256, adamw 3e-3)", minimum=0)
    #: SGD momentum, or AdamW's β1 (β2 is 0.95, GPT-3's: steadier on short runs than 0.999).
    momentum: float = option(0.9, "SGD momentum, or AdamW beta1", minimum=0)
    #: None: 7e-5 for classify (the paper's), 0.1 for lm (decoupled AdamW decay, GPT-2's).
    weight_decay: float | None = option(None, "weight decay", minimum=0)
    #: No weight decay on 1-D parameters (BatchNorm/LayerNorm scales and shifts, biases).
    #: None: off for classify (the paper decays everything), on for lm (GPT practice).
    no_wd_bn_bias: bool | None = option(
        None, "no weight decay on norm layers and biases (--wd-bn-bias: decay them)"
    )
    #: None: 0.1 for classify (the paper's); 0 for lm, whose train loss should be the same
    #: cross-entropy as the validation loss that perplexity is computed from.
    label_smoothing: float | None = option(None, "label smoothing", minimum=0)
    #: Linear warm-up length in epochs (fractions allowed) before the cosine decay to 0.
    #: None: 0 for classify; 10 % of the run for lm (Adam's early steps are noisy).
    warmup_epochs: float | None = option(
        None,
        "linear warm-up epochs before the cosine decay (default: classify 0, lm and "
        "detection 10%% of the run, detection at most 1)",
        minimum=0,
    )
    #: Clip the global gradient norm to this before each step (0: no clipping). None: 0 for
    #: classify, 1.0 for lm (attention logits can spike early in training).
    grad_clip: float | None = option(None, "clip the gradient norm, 0 = off", minimum=0)
    seed: int = option(0, "random seed", minimum=0)
    #: DataLoader worker processes (0: load in the training process).
    workers: int = option(0, "data loader worker processes (image folders)", minimum=0)

    # -- execution ------------------------------------------------------------------------
    device: str = option("auto", "where to train", choices=DEVICES)
    amp: str = option(
        "none",
        "autocast: bf16 (what --amp alone means; CPU and CUDA) or fp16 (CUDA, with a "
        "GradScaler); none to turn off a config file's setting",
        choices=AMP_MODES,
        cli="optional:bf16",
    )
    channels_last: bool = option(False, "channels-last memory format")
    #: How the sparse layers' products run (``sparsify_``'s ``backend``): ``cpu_sparse``
    #: runs the Linear layers' 2:4 products on the CPU's vector units (float32, no
    #: autocast, no compile). Execution only: not part of the run's identity.
    backend: str = option(
        "auto",
        "the sparse layers' backend; cpu_sparse: the Linear layers' 2:4 products on the "
        "CPU's vector units (docs/training-speed.md)",
        choices=BACKENDS,
    )
    compile: bool = option(False, "torch.compile the model (refused clearly if it cannot work)")
    #: Under DDP, replace BatchNorm by SyncBatchNorm (global-batch statistics).
    sync_bn: bool = option(False, "SyncBatchNorm under torchrun (global batch statistics)")
    #: Under torchrun, shard the model with FSDP2 (a unit per sparse layer) instead of DDP.
    fsdp: bool = option(False, "shard the model with FSDP2 under torchrun instead of DDP")
    #: ``torch.use_deterministic_algorithms(True)`` + seeding: reruns and resumes are
    #: bit-identical on CPU with the same thread count (float sums depend on it), and on
    #: CUDA where every op has a deterministic kernel.
    deterministic: bool = option(
        False, "deterministic algorithms: bit-identical reruns and resumes"
    )
    #: CPU threads of this process (None: torch's default, ``OMP_NUM_THREADS``). Float sums
    #: depend on it: a deterministic resume is bit-identical only with the same count.
    threads: int | None = option(
        None, "CPU threads (default: torch's, i.e. OMP_NUM_THREADS)", minimum=1
    )
    #: On a NaN/Inf loss or gradient skip the step (and count it) instead of stopping.
    skip_nonfinite: bool = option(
        False, "skip steps with a NaN/Inf loss or gradient instead of stopping"
    )

    # -- run folder -----------------------------------------------------------------------
    #: Run folder (None: ``runs/<dataset>-<model>-<recipe>-seed<seed>``).
    out: str | None = option(
        None, "run folder (default: runs/<dataset>-<model>-<recipe>-seed<seed>)"
    )
    #: Continue from ``<out>/last.pt`` (True) or from the checkpoint at this path.
    resume: bool | str = option(
        False,
        "continue the run in --out with its saved config (or from CHECKPOINT)",
        cli="optional:True",
    )
    #: Replace the results of an existing run folder.
    force: bool = option(False, "replace the results in an existing run folder")
    #: End this invocation after this epoch (the schedule still spans ``epochs``); resume
    #: later with ``resume=True`` — for time-limited jobs.
    stop_after: int | None = option(
        None, "end this invocation after epoch N (resume later)", minimum=1
    )
    #: Also write ``last.pt`` every this many steps inside an epoch (0: at epoch ends
    #: only), so a run killed mid-epoch loses at most that many steps; resuming from such a
    #: checkpoint continues at the next step, bit-exactly with ``deterministic``. classify.
    checkpoint_every: int = option(
        0, "also write last.pt every N steps within an epoch (classify; 0 = off)", minimum=0
    )
    #: Show a progress bar on stderr.
    progress: bool = option(True, "progress bar on stderr")
    #: Print nothing on stdout (the run folder's ``train.log`` still gets everything).
    quiet: bool = option(False, "print nothing but errors (train.log still gets everything)")
    #: Write ``curves.png`` when matplotlib is installed.
    plot: bool = option(True, "draw curves.png when matplotlib is installed")
    #: Metrics trackers (``fullsparse.train.trackers``), comma-separated (a list in Python
    #: or YAML): tensorboard, wandb, mlflow (each its extra), csv; ``none``: no tracker.
    report_to: str = option(
        "none",
        "metrics trackers, comma-separated or repeated (tensorboard, wandb, mlflow need the "
        "extra of that name)",
        choices=REPORTERS,
        cli="append",
    )
    #: Every N optimizer steps, log the step's scalars (mean loss since the last, lr,
    #: throughput, gradient norm, skipped steps, sparse GEMM fraction) to train.log and the
    #: trackers (0: per-epoch metrics only).
    log_every: int = option(0, "log per-step scalars every N optimizer steps (0 = off)", minimum=0)
    #: Level of the console and train.log (the ``fullsparse.train`` logger).
    log_level: str = option("info", "console and train.log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        if isinstance(self.report_to, (list, tuple)):  # several trackers, as a list
            object.__setattr__(self, "report_to", ",".join(map(str, self.report_to)))
        problems = [p for p in (_check(name, getattr(self, name)) for name in _SPEC) if p]
        if problems:
            raise ConfigError("; ".join(problems))
        check_config_ranges(self)  # fullsparse.limits: seed, sizes, counts, string lengths
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {', '.join(TASKS)}")
        for name, value in task_defaults(self).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: filled once, at build
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        check_task_fields(self)
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} is not one of {', '.join(DEVICES)}")
        parse_report_to(self.report_to)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level={self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
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
        check_schedule_fields(self.dense_warmup_steps, self.dense_finish, self.dense_finish_mode)
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"batch_size={self.batch_size} clashes with grad_accum_steps="
                f"{self.grad_accum_steps}: the batch must split into equal micro-batches"
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
#: A field's type (as written in the class) -> the kind of value it takes.
_KINDS = {
    "str": _STR, "int": _INT, "float": _FLOAT, "bool": _BOOL, "dict[str, Any]": "dict",
    "bool | str": "bool_or_str",
}  # fmt: skip


def field_spec(f: dataclasses.Field) -> tuple[str, bool, float | None]:
    """(kind, may be None, minimum) of a TrainConfig field, read from its declaration."""
    return _spec(f)


def _spec(f: dataclasses.Field) -> tuple[str, bool, float | None]:
    """(kind, may be None, minimum) of a TrainConfig field, read from its declaration."""
    declared = str(f.type)
    optional = declared.endswith(" | None")
    return _KINDS[declared.removesuffix(" | None")], optional, f.metadata["minimum"]


_SPEC: dict[str, tuple[str, bool, float | None]] = {
    f.name: _spec(f) for f in dataclasses.fields(TrainConfig)
}
_FIELDS = tuple(_SPEC)


def _finite(value: float) -> bool:
    """A finite float; an integer too large for a float (a 401-digit ``lr``) is not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**24:
        return f"a number of {len(str(abs(value)))} digits"
    return repr(value)


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
        ok = ok and _finite(value)
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
    return None if ok else f"{name} must be {want}, got {_shown(value)}"


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
