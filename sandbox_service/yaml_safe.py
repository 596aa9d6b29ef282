"""Loading YAML files that users edit: safe constructors only, and refusals that say why.

On top of `yaml.SafeLoader` (no Python objects, no code): duplicate keys are an error (PyYAML
would silently keep the last), `1e-3` and `2e6` are numbers (YAML 1.1 wants `1.0e-3`), files are
capped in size, and anchors/aliases may not expand past a node budget (the "billion laughs" bomb).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_NODES = 100_000


class YamlError(ValueError):
    """The file is not YAML this project accepts; the message names the file and line."""


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise YamlError(f"line {line}: duplicate key {key!r} (first on line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_FLOAT = re.compile(
    r"^[-+]?(?:\d[\d_]*)?\.?\d*(?:[eE][-+]?\d+)$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def loads(text: str, source: str = "<string>") -> Any:
    """Parse YAML text; errors are YamlError naming `source`."""
    if len(text.encode()) > MAX_BYTES:
        raise YamlError(f"{source}: file is larger than {MAX_BYTES} bytes")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except YamlError as e:
        raise YamlError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{source}: not valid YAML: {e}") from None
    _check_size(data, source)
    return data


def load(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YamlError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise YamlError(f"{path}: cannot read: {e}") from None
    return loads(text, str(path))


def _check_size(data: Any, source: str) -> None:
    """Count nodes as if aliases were expanded, memoised by identity so the count is cheap."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(obj: Any) -> int:
        if id(obj) in sizes:
            return sizes[id(obj)]
        if id(obj) in open_:
            raise YamlError(f"{source}: an alias refers to itself (recursive structure)")
        open_.add(id(obj))
        if isinstance(obj, dict):
            n = 1 + sum(size(k) + size(v) for k, v in obj.items())
        elif isinstance(obj, list):
            n = 1 + sum(size(v) for v in obj)
        else:
            n = 1
        sizes[id(obj)] = n
        open_.discard(id(obj))
        if n > MAX_NODES:
            raise YamlError(f"{source}: expands to more than {MAX_NODES} nodes (alias bomb?)")
        return n

    size(data)
