"""Reading a run config file (``.json`` / ``.yaml``) into a plain dict, every problem one
``ConfigError`` line; :mod:`fullsparse.train.config` validates what it holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fullsparse.errors import ConfigError
from fullsparse.limits import check_config_file

__all__ = ["load_config_file"]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.json`` or ``.yaml``/``.yml`` run config into a dict (not yet validated).

    YAML needs PyYAML (the ``yaml`` extra), imported only here; every problem is one
    ConfigError line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    check_config_file(path)  # fullsparse.limits: size, nesting depth, YAML aliases
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
                f"reading {path} needs PyYAML, the yaml extra: pip install 'fullsparse[yaml]' "
                "(or pip install pyyaml, or use a .json config)"
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
