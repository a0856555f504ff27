"""Limits on what a file may make fullsparse allocate, and one-line messages about files.

Data files, configs and checkpoints come from other people. A small file can promise a
huge array in its header, hide gigabytes of zeros behind gzip, nest a structure thousands
deep, or share one object a million times (pickle memo, YAML alias). Every loader checks
what it reads against the table :data:`LIMITS` *before* it allocates, and each limit can be
raised with an environment variable (``FULLSPARSE_MAX_<NAME>``) for unusual data.
``docs/reliability.md`` lists them with the class of file each defends against.

Bottom layer: imports only the standard library and torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fullsparse.errors import ConfigError, UserError

__all__ = [
    "LIMITS",
    "CONFIG_RANGES",
    "MESSAGE_CHARS",
    "Limit",
    "limit",
    "exceeded",
    "escape",
    "worker_message",
    "one_line",
    "read_capped",
    "check_structure",
    "check_config_file",
    "check_config_ranges",
    "load_json_text",
    "json_memory_estimate",
    "check_json_memory",
    "load_yaml_text",
]

#: The longest error line (characters) fullsparse prints about a file.
MESSAGE_CHARS = 300

_GIB = 1 << 30
_MIB = 1 << 20


@dataclass(frozen=True)
class Limit:
    """One limit: its default, what it bounds, and the files it defends against."""

    default: int
    bounds: str
    defends: str

    def env(self, name: str) -> str:
        return f"FULLSPARSE_MAX_{name.upper()}"


#: name -> Limit. The override is the environment variable ``FULLSPARSE_MAX_<NAME>``.
LIMITS: dict[str, Limit] = {
    "idx_bytes": Limit(
        1 * _GIB, "bytes of one IDX file's payload after gunzip", "IDX gzip bomb, huge header"
    ),
    "image_side": Limit(
        8192,
        "side of an image: IDX dims, config image_size, checkpoint identity",
        "IDX header [2, 6000, 6000]; image_size: 100000",
    ),  # fmt: skip
    "image_pixels": Limit(
        100_000_000,
        "pixels of one decoded image file (checked before decoding)",
        "decompression-bomb PNG/JPEG",
    ),  # fmt: skip
    "pickle_bytes": Limit(512 * _MIB, "size of one CIFAR batch pickle", "oversized pickle"),
    "objects": Limit(
        2_000_000,
        "objects reached when walking a loaded pickle/checkpoint/config, "
        "counting a shared object once per reference",
        "pickle memo / YAML alias expansion",
    ),  # fmt: skip
    "depth": Limit(64, "nesting depth of JSON, YAML and pickled structures", "deep nesting"),
    "yaml_aliases": Limit(100, "YAML aliases (*name) in a config file", "billion-laughs YAML"),
    "config_bytes": Limit(1 * _MIB, "size of a config file", "oversized config"),
    "annotation_bytes": Limit(
        2 * _GIB, "size of a COCO json / VOC xml annotation file", "oversized annotations"
    ),
    "json_expansion": Limit(
        16,
        "memory of a parsed COCO json, estimated from its brackets and separators before "
        "parsing, as a multiple of the file's size",
        "100 MB of empty lists (3.3 GB parsed)",
    ),  # fmt: skip
    "boxes_per_image": Limit(
        10_000,
        "boxes of one image in a COCO or VOC annotation file",
        "1.3 M boxes on one image (gigabytes in the detector's loss)",
    ),  # fmt: skip
    "compression_ratio": Limit(
        50,
        "uncompressed / stored size of an entry of a checkpoint (zip)",
        "compressed tensor bomb in a checkpoint",
    ),  # fmt: skip
    "classes": Limit(
        100_000,
        "num_classes of a checkpoint identity, config or dataset",
        "checkpoint identity num_classes = 12,000,000",
    ),  # fmt: skip
    "channels": Limit(64, "in_channels of a checkpoint identity", "forged checkpoint identity"),
    "epochs": Limit(100_000, "epochs of a config", "epochs: 10**23"),
    "count": Limit(
        1_000_000_000,
        "other counts of a config (batch size, steps, synthetic sizes, ...)",
        "absurd config values",
    ),  # fmt: skip
    "text_bytes": Limit(
        4 * _GIB, "text corpus bytes (text_train_bytes, text_val_bytes)", "absurd config values"
    ),  # fmt: skip
    "string_chars": Limit(4096, "characters of a config string field", "5 MB recipe string"),
    "model_size": Limit(
        1 << 16,
        "any number among a built-in model's options (model_kwargs: widths, context, ...)",
        "model_kwargs embed_dim: 10**9",
    ),  # fmt: skip
    "model_depth": Limit(1024, "depth (blocks) of a built-in model", "model_kwargs depth: 10**8"),
    "model_elements": Limit(
        10**10,
        "parameters + buffer entries of a built-in model, counted on the meta device",
        "widths that need terabytes",
    ),  # fmt: skip
}


def limit(name: str) -> int:
    """The value of limit ``name``: ``$FULLSPARSE_MAX_<NAME>`` if set, else the default."""
    spec = LIMITS[name]
    raw = os.environ.get(spec.env(name))
    if raw is None or raw.strip() == "":
        return spec.default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = -1
    if value < 1:
        raise UserError(f"{spec.env(name)} must be a positive integer, got {escape(raw)}")
    return value


def _hint(name: str) -> str:
    return f"limit {limit(name):,}; raise it with {LIMITS[name].env(name)}"


def exceeded(what: str, value: int, name: str) -> str:
    """``"<what> is <value>, over the limit N; raise it with FULLSPARSE_MAX_..."``."""
    return f"{what} is {value:,}, over the {_hint(name)}"


# ---------------------------------------------------------------------------------------
# Messages


def escape(text: Any, width: int = MESSAGE_CHARS) -> str:
    """``text`` on one printable line: control characters (newline, ESC, ...) shown as
    Python escapes, and cut to ``width`` characters with an ellipsis."""
    text = str(text)
    if len(text) > 4 * width:  # never escape a whole 10 MB string to cut it afterwards
        text = text[: 4 * width]
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= width else out[: width - 1] + "…"


def one_line(message: str, width: int = MESSAGE_CHARS) -> str:
    """An error message as the CLI prints it: escaped, at most ``width`` characters, the
    end kept when the middle must go (the rule usually comes last)."""
    if len(message) > 8 * width:  # never escape a whole file held in a message
        message = message[: 4 * width] + "…" + message[-2 * width :]
    flat = escape(message, width=1 << 30)
    if len(flat) <= width:
        return flat
    keep_tail = width // 3
    return flat[: width - keep_tail - 1] + "…" + flat[-keep_tail:]


def worker_message(text: str, exc_name: str) -> str:
    """The original message of an exception re-raised by a DataLoader from a worker
    (``"Caught X in DataLoader worker process N.\\nOriginal Traceback ... X: message"``)."""
    if "DataLoader worker process" not in text or "Original Traceback" not in text:
        return text
    marker = f"{exc_name}: "
    at = text.rfind(marker)
    return text[at + len(marker) :].strip() if at >= 0 else text


# ---------------------------------------------------------------------------------------
# Reading with caps


def read_capped(path: Any, cap: int, what: str, name: str) -> bytes:
    """The bytes of ``path``, refused (UserError) if the file is larger than ``cap``.

    Reads the file's size plus one byte, never ``cap`` bytes at once: ``read(n)``
    allocates ``n`` bytes up front, so ``read(2 GiB)`` of a 1 kB file needed 2 GiB of
    address space (a MemoryError under ``ulimit -v``). A file that grows while it is read
    is read on in 1 MiB chunks, up to the cap."""
    try:
        size = os.path.getsize(path)
        if size > cap:
            raise UserError(f"{what} {path}: {exceeded('its size in bytes', size, name)}")
        with open(path, "rb") as f:
            data = f.read(size + 1)
            if len(data) > size:  # it grew since its size was read
                parts, total = [data], len(data)
                while total <= cap:
                    chunk = f.read(min(1 << 20, cap + 1 - total))
                    if not chunk:
                        break
                    parts.append(chunk)
                    total += len(chunk)
                data = b"".join(parts)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise UserError(f"{what} {path}: {exceeded('its size in bytes', len(data), name)}")
    return data


# ---------------------------------------------------------------------------------------
# Loaded structures: nesting depth and expansion of shared references


def check_structure(obj: Any, where: str, error: type[UserError] = UserError) -> None:
    """Walk ``obj`` (dict/list/tuple/set; tensors and scalars are leaves) and refuse it
    (``error``) if it is nested deeper than the ``depth`` limit or reaches more than
    ``objects`` objects, counting a shared object once per reference — what a later walk
    (``json.dumps``, a copy) would expand it to. Stops as soon as a limit is passed."""
    max_objects, max_depth = limit("objects"), limit("depth")
    seen = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > max_objects:
            what = "the number of objects (shared ones counted once per use)"
            raise error(f"{where}: {exceeded(what, seen, 'objects')}")
        if isinstance(item, (dict, list, tuple, set, frozenset)):
            if depth > max_depth:
                raise error(f"{where}: {exceeded('the nesting depth', depth, 'depth')}")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


# ---------------------------------------------------------------------------------------
# JSON and YAML text with depth and alias limits


def _json_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting of JSON ``text`` (strings skipped), before parsing it:
    Python's json parser recurses, so a deep file would end in RecursionError."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


#: Upper bounds (bytes, CPython 3.10-3.13) of what json.loads builds, by what the text
#: holds. A container: an empty dict 64 or list 56, plus growth slack. An element (one per
#: ``,`` or ``:``, plus one): its pointer and a float (24) or int (28), a dict entry's
#: share, list slack. A string (two quotes) adds its header (49 ASCII, up to 76 for
#: non-BMP text). The characters of strings and numbers: at most 2 bytes each (a 4-byte
#: UTF-8 character becomes 4 bytes; ``\ud83d\ude00`` 12 becomes 4). Measured worst cases, per
#: item: 64 bytes for ``[]``, 72 for ``{}``, 248 for ``{"a":[]}``, 104 for
#: ``"\ud83d\ude00"``, 144 for a ``"k1":0`` dict entry (``tests/test_reliability_before_run.py``).
_JSON_PER_CONTAINER = 96
_JSON_PER_ELEMENT = 48
_JSON_PER_QUOTE = 28


def json_memory_estimate(raw: bytes) -> int:
    """An upper bound of the bytes ``json.loads`` needs for ``raw``, from counts of its
    brackets, separators and quotes (a few C-speed passes, no parsing; see the constants
    above). Those inside strings are counted too, so it only errs high."""
    containers = raw.count(b"[") + raw.count(b"{")
    elements = raw.count(b",") + raw.count(b":") + 1
    quotes = raw.count(b'"')
    return (
        _JSON_PER_CONTAINER * containers
        + _JSON_PER_ELEMENT * elements
        + _JSON_PER_QUOTE * quotes
        + 2 * len(raw)
    )


#: Parsed JSON up to this size (estimated) is never refused: a small file of many small
#: objects cannot hurt, whatever its ratio.
_JSON_SLACK = 64 << 20


def check_json_memory(raw: bytes, where: str, error: type[UserError] = UserError) -> None:
    """Refuse JSON whose parsed form could take more than ``json_expansion`` times its size
    and more than 64 MiB (:func:`json_memory_estimate`), before it is parsed."""
    need = json_memory_estimate(raw)
    ratio = limit("json_expansion")
    if need > ratio * max(len(raw), 1) and need > _JSON_SLACK:
        times = need // max(len(raw), 1)
        raise error(
            f"{where}: parsing it could take {need:,} bytes, {times} times its size "
            f"({len(raw):,} bytes; mostly empty lists or objects?): "
            f"{exceeded('that multiple', times, 'json_expansion')}"
        )


def load_json_text(text: str, where: str, error: type[UserError] = UserError) -> Any:
    """``json.loads`` with the ``depth`` limit checked first and the ``objects`` limit
    after; ``ValueError`` from the parser becomes ``error`` naming ``where``."""
    import json

    depth = _json_depth(text)
    if depth > limit("depth"):
        raise error(f"{where}: {exceeded('the nesting depth', depth, 'depth')}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise error(f"{where} is not valid JSON: {exc}") from None
    check_structure(data, where, error)
    return data


def load_yaml_text(text: str, where: str, error: type[UserError] = UserError) -> Any:
    """``yaml.safe_load`` with the ``yaml_aliases`` and ``depth`` limits enforced while the
    document is composed (before any object is built), and ``objects`` after."""
    import yaml

    aliases, depth_cap = limit("yaml_aliases"), limit("depth")

    class _Loader(yaml.SafeLoader):
        _depth = 0
        _aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > aliases:
                    raise error(
                        f"{where}: {exceeded('the number of YAML aliases', self._aliases, 'yaml_aliases')}"  # noqa: E501
                    )
            self._depth += 1
            try:
                if self._depth > depth_cap:
                    raise error(f"{where}: {exceeded('the nesting depth', self._depth, 'depth')}")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise error(f"{where} is not valid YAML: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where} is not valid YAML{at}: {problem}") from None
    check_structure(data, where, error)
    return data


def check_config_file(path: Any) -> None:
    """Refuse a ``.json``/``.yaml`` config file over the ``config_bytes`` limit, nested past
    ``depth``, with more than ``yaml_aliases`` aliases, or expanding past ``objects``
    (ConfigError naming the file and the rule); other problems are left to the reader."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return
    raw = read_capped(path, limit("config_bytes"), "config file", "config_bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        load_json_text(text, f"config file {path}", ConfigError)
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml  # noqa: F401
        except ImportError:
            return  # the reader says how to install it
        load_yaml_text(text, f"config file {path}", ConfigError)


# ---------------------------------------------------------------------------------------
# Numeric config fields

#: Config field -> (lowest, limit name or fixed highest). Checked after the type checks.
CONFIG_RANGES: dict[str, tuple[int, str | int]] = {
    "seed": (0, (1 << 63) - 1),  # what torch.manual_seed accepts as a signed 64-bit value
    "image_size": (1, "image_side"),
    "epochs": (1, "epochs"),
    "stop_after": (1, "epochs"),
    "num_classes": (1, "classes"),
    "synthetic_classes": (1, "classes"),
    "batch_size": (1, "count"),
    "steps_per_epoch": (1, "count"),
    "synthetic_train": (1, "count"),
    "synthetic_test": (1, "count"),
    "train_subset": (1, "count"),
    "test_subset": (1, "count"),
    "tsm_interval": (1, "count"),
    "checkpoint_every": (0, "count"),
    "mask_interval": (1, "count"),  # schedules
    "sample_group": (0, "count"),
    "dense_warmup_steps": (0, "count"),
    "workers": (0, 1024),
    "text_train_bytes": (2, "text_bytes"),
    "text_val_bytes": (2, "text_bytes"),
}


def _leaves(values: Any) -> list[tuple[str, Any]]:
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
    if not isinstance(values, Mapping):
        return []
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += _leaves(value)
        else:
            out.append((str(key), value))
    return out


def check_config_ranges(values: Any, source: str = "config") -> None:
    """Refuse numbers outside :data:`CONFIG_RANGES` and over-long strings (ConfigError,
    one line naming each field and its range). ``values`` is a config dataclass (nested
    ones are walked) or a mapping; fields not in the table are left to their own checks."""
    problems = []
    chars = limit("string_chars")
    for name, value in _leaves(values):
        if isinstance(value, str) and len(value) > chars:
            problems.append(exceeded(f"the length of {name}", len(value), "string_chars"))
            continue
        if name not in CONFIG_RANGES or isinstance(value, bool) or not isinstance(value, int):
            continue
        low, high = CONFIG_RANGES[name]
        top = limit(high) if isinstance(high, str) else high
        if not low <= value <= top:
            hint = f"; raise the top with {LIMITS[high].env(high)}" if isinstance(high, str) else ""
            digits = len(str(value))
            shown = str(value) if digits <= 24 else f"a number of {digits} digits"
            problems.append(f"{name} must be in {low}..{top:,}, got {shown}{hint}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
