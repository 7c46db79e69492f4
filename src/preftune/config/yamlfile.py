"""Every YAML text preftune reads (``--config``, pipeline files, ``--set`` lists) is read here.

``yaml.safe_load`` runs no code, but it lets two things through silently. A key written twice
keeps only its last value (``train:`` twice loses the first section, two stages named ``sft``
keep only the second). And aliases expand: nine lines of ``&a [*b, *b, …]`` stand for a
billion values, built lazily as shared objects and expanded only when something walks them
(printing a key, fingerprinting a stage), long after the file was "read". Both are refused
here, from the parsed nodes and before any value is built, with the file, the line and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["MAX_EXPANDED", "parse_yaml", "read_yaml"]

MAX_EXPANDED = 100_000
"""The most values a document may stand for once its aliases are expanded. A config or a
pipeline with anchors for shared sections stays in the hundreds; an alias bomb is millions."""

MERGE = "tag:yaml.org,2002:merge"
COMPLEX = object()
"""The key of a mapping whose key is itself a list or a mapping: never compared."""


def read_yaml(path: str | Path, what: str) -> tuple[Any, dict[str, int]]:
    """The document in ``path`` (a ``what``: "config file", "pipeline file") and the line of each
    key, dotted (``stages.sft.train``); a :class:`ConfigError` naming the file (and line) otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str, numbered: bool = True) -> tuple[Any, dict[str, int]]:
    """The document in ``text``, read from ``source`` (a file's path, or the key of a value given
    with ``--set``: ``numbered=False``, no line numbers), and the line of each key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        walk = _Walk(loader, source, numbered)
        walk.size(node, "")
        return loader.construct_document(node), walk.lines
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        where = f"{source}:{mark.line + 1}" if mark is not None and numbered else source
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{source}: malformed YAML (nested too deeply)") from None
    finally:
        loader.dispose()


@dataclass
class _Walk:
    """One pass over a document's nodes: the values it stands for with its aliases expanded
    (counted once per node, so the pass is as cheap as the text), the keys written twice."""

    loader: yaml.SafeLoader
    source: str
    numbered: bool
    lines: dict[str, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    open: set[int] = field(default_factory=set)
    aliased: bool = False

    def where(self, node: yaml.Node) -> str:
        return f"{self.source}:{node.start_mark.line + 1}" if self.numbered else self.source

    def size(self, node: yaml.Node, path: str) -> int:
        """The values ``node`` stands for, itself included; refuses a node that contains itself
        and a document that expands past :data:`MAX_EXPANDED`."""
        if id(node) in self.sizes:  # an alias: the node was counted where its anchor is
            self.aliased = True
            return self.sizes[id(node)]
        if id(node) in self.open:
            raise ConfigError(
                f"{self.where(node)}: {path or 'the document'}: an alias inside its own anchor (a value that contains itself)"
            )
        self.open.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += self.mapping(node, path)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(self.size(item, f"{path}[{i}]") for i, item in enumerate(node.value))
        if total > MAX_EXPANDED and self.aliased:
            raise ConfigError(
                f"{self.where(node)}: {path or 'the document'}: its aliases expand to more than "
                f"{MAX_EXPANDED} values (an alias bomb); write the values out instead"
            )
        self.open.discard(id(node))
        self.sizes[id(node)] = total
        return total

    def mapping(self, node: yaml.MappingNode, path: str) -> int:
        """The values of a mapping; a key written twice is refused, naming both lines."""
        seen: dict[Any, int] = {}
        total = 0
        for key_node, value_node in node.value:
            if key_node.tag == MERGE:  # `<<: *defaults`: the keys written here override its keys
                total += self.size(value_node, path)
                continue
            key = self.loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else COMPLEX
            dotted = f"{path}.{key}" if path else str(key)
            line = key_node.start_mark.line + 1
            if key is not COMPLEX and key in seen:
                raise ConfigError(
                    f"{self.where(key_node)}: duplicate key '{dotted}' (first on line {seen[key]}); "
                    "a key may appear once in a mapping: YAML would keep only the last"
                )
            if key is not COMPLEX:
                seen[key] = line
                self.lines.setdefault(dotted, line)
            total += self.size(value_node, dotted)
        return total
