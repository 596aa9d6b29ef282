"""Loading YAML files that users edit: safe constructors only, and refusals that say why.

On top of `yaml.SafeLoader` (no Python objects, no code): duplicate keys are an error (PyYAML
would silently keep the last), `1e-3` and `2e6` are numbers (YAML 1.1 wants `1.0e-3`), files are
capped in size (and never read past the cap), anchors/aliases may not expand past a node budget
(the "billion laughs" bomb) nor nest past a depth, and a value PyYAML's constructors cannot read
(`2024-13-45`, `!!int abc`) is a YamlError with its line, like a syntax error.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 64  # a spec nests about 6 levels; PyYAML and the checks recurse per level


class YamlError(ValueError):
    """The file is not YAML this project accepts; the message names the file and line."""


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = {}
        if not isinstance(node, yaml.MappingNode):  # e.g. `!!set [a]`: PyYAML says why
            return super().construct_mapping(node, deep=deep)
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; the keys written beside it override the base's
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                line = key_node.start_mark.line + 1
                raise YamlError(f"line {line}: a key must be a scalar, got a {type(key).__name__}")
            if key in seen:
                line = key_node.start_mark.line + 1
                raise YamlError(f"line {line}: duplicate key {key!r} (first on line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except YamlError:
            raise
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            # PyYAML's scalar constructors raise these for values their patterns let through:
            # `2024-13-45`, an int of more than 4300 digits, `!!int abc`, `!!timestamp 2024-1-1x`,
            # `!!bool maybe`, `!!int ''`.
            line = node.start_mark.line + 1
            value = node.value[:40] if isinstance(node.value, str) else node.tag
            raise YamlError(f"line {line}: {value!r} cannot be read: {e}") from None


_FLOAT = re.compile(
    r"^[-+]?(?:\d[\d_]*)?\.?\d*(?:[eE][-+]?\d+)$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def loads(text: str, source: str = "<string>") -> Any:
    """Parse YAML text; errors are YamlError naming `source`."""
    if len(text.encode(errors="surrogatepass")) > MAX_BYTES:
        raise YamlError(f"{source}: file is larger than {MAX_BYTES} bytes")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except YamlError as e:
        raise YamlError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise YamlError(f"{source}: nested more than {MAX_DEPTH} levels deep") from None
    _check_size(data, source)
    return data


def load(path: str | Path) -> Any:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)  # a huge file (or /dev/zero) is refused, not read whole
    except FileNotFoundError:
        raise YamlError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise YamlError(f"{path}: cannot read: {e}") from None
    if len(data) > MAX_BYTES:
        raise YamlError(f"{path}: file is larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlError(f"{path}: not UTF-8 text: {e}") from None
    return loads(text, str(path))


def _check_size(data: Any, source: str) -> None:
    """Count nodes and levels as if aliases were expanded, memoised by identity so the count is
    cheap; every later step walks the data recursively, so depth is capped like size."""
    measured: dict[int, tuple[int, int]] = {}  # id -> (nodes, levels)
    open_: set[int] = set()  # the containers on the path from the root

    def measure(obj: Any) -> tuple[int, int]:
        if id(obj) in measured:
            return measured[id(obj)]
        if id(obj) in open_:
            raise YamlError(f"{source}: an alias refers to itself (recursive structure)")
        if len(open_) > MAX_DEPTH:
            raise YamlError(f"{source}: nested more than {MAX_DEPTH} levels deep")
        open_.add(id(obj))
        if isinstance(obj, dict):
            parts = [measure(x) for item in obj.items() for x in item]
        elif isinstance(obj, list):
            parts = [measure(v) for v in obj]
        else:
            parts = []
        n = 1 + sum(p[0] for p in parts)
        levels = 1 + max((p[1] for p in parts), default=0)
        measured[id(obj)] = (n, levels)
        open_.discard(id(obj))
        if n > MAX_NODES:
            raise YamlError(f"{source}: expands to more than {MAX_NODES} nodes (alias bomb?)")
        if levels > MAX_DEPTH:
            raise YamlError(f"{source}: nested more than {MAX_DEPTH} levels deep")
        return n, levels

    measure(data)
