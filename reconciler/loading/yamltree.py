"""YAML text → plain Python data plus the position of every key and value.

The text is *composed* by ruamel.yaml (round-trip resolver, YAML 1.2, so
``yes``/``no`` stay strings) into a node graph carrying line/column marks, and
this module builds plain dicts, lists and scalars from it while recording each
path's position in a :class:`~.positions.Positions`. Building the data here,
rather than with ruamel's constructor, lets us report *every* duplicate key
(ruamel stops at the first) and keeps control over aliases.

Aliases and merge keys (``<<: *defaults``) are allowed, because operators use
them to share settings between services. To defuse "billion laughs" documents,
the values built by re-expanding aliases are counted and the document is
rejected beyond :data:`MAX_ALIAS_VALUES`; recursive aliases and nesting deeper
than :data:`MAX_DEPTH` are rejected too. Timestamps are kept as the text the
operator wrote (pydantic parses them, and insists on a timezone). Custom tags
(``!foo``, ``!!binary``, ``!!set``) are errors: a profile is plain data.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, NamedTuple

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.tag import Tag

from reconciler.errors import Diagnostic, InputError
from reconciler.loading.positions import Mark, Path, Positions

MAX_ALIAS_VALUES = 10_000
MAX_DEPTH = 64
# anchors, tags, directives; YAML 1.1's line breaks: a text holding one is composed by the pure parser
_PURE_ONLY = ("&", "!", "%", "\x85", "\u2028", "\u2029")

_CORE = "tag:yaml.org,2002:"
_MAP, _SEQ, _NULL, _MERGE, _TIMESTAMP = (_CORE + t for t in ("map", "seq", "null", "merge", "timestamp"))
_SCALARS = {_CORE + t for t in ("str", "int", "float", "bool", "null", "timestamp")}
_HINTS = {
    "found character '\\t' that cannot start any token": "indent with spaces; YAML does not allow tabs",
    "mapping values are not allowed here": "quote a value that contains ': ', or fix the indentation",
}


class Document(NamedTuple):
    data: Any
    positions: Positions


def parse_yaml(text: str, filename: str) -> Document:
    """Parse one YAML (or JSON) document; an empty document is an error."""
    yaml = YAML(typ="rt")
    root = _compose_fast(text, yaml)
    if root is not None:
        return _document(root, filename, yaml)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReusedAnchorWarning)
            root = yaml.compose(text)
        reused = [w for w in caught if issubclass(w.category, ReusedAnchorWarning)]
        if reused:
            raise InputError([_reused_anchor(str(reused[0].message), filename)])
    except MarkedYAMLError as exc:
        raise InputError([_syntax_error(exc, filename)]) from None
    except YAMLError as exc:
        raise InputError([Diagnostic(filename, 1, 1, f"YAML error: {exc}")]) from None
    except RecursionError:
        raise InputError([Diagnostic(filename, 1, 1, f"nested too deeply (more than {MAX_DEPTH} levels)")]) from None
    if root is None:
        raise InputError([Diagnostic(filename, 1, 1, "file is empty (no YAML document in it)")])
    return _document(root, filename, yaml)


def _document(root: Node, filename: str, yaml: YAML) -> Document:
    builder = _Builder(filename, yaml)
    data = builder.build(root, (), depth=0)
    if builder.diagnostics:
        raise InputError(builder.diagnostics)
    return Document(data, builder.positions)


def _compose_fast(text: str, yaml: YAML) -> Node | None:
    """The node graph from libyaml (ruamel's C parser: about 15× faster on a large profile), or None.

    None sends the caller to the pure parser, whose messages and checks the
    golden error tests pin: for a text libyaml finds wrong, an empty one, one
    with anchors (the pure composer reports an anchor defined twice; libyaml
    does not) or tags (refused by the builder, which must see them as
    written), a ``%`` directive, a line break of YAML 1.1 alone (NEL, LS,
    PS: libyaml counts lines at them, YAML 1.2 does not), or where the C
    extension is missing. Small texts take it too (issue 10): ``ruamel.yaml``
    imports its C extension in any case, and the pure parser cost ``reconciler
    plan`` on a tiny scenario 74 M of its 887 M instructions (its Python scanner,
    and compiling the regular expression that checks a non-ASCII text for
    unprintable characters). The C
    composer runs with ruamel's base resolver (every scalar a string, every
    mapping a map: no regular expressions in Python for each scalar, a third of
    the time of its YAML 1.1 resolver); each plain scalar is resolved here by the
    round-trip resolver (YAML 1.2, as the pure path does), so both paths give the
    same tags and marks (``tests/test_loading_yaml.py`` compares them on every
    profile shipped).
    """
    if any(sign in text for sign in _PURE_ONLY):
        return None
    try:
        from ruamel.yaml.cyaml import CBaseLoader  # ModuleNotFoundError without the C extension

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader = CBaseLoader(text)
            try:
                root: Node | None = loader.get_single_node()
            finally:
                loader.dispose()
    except Exception:  # noqa: BLE001  (any complaint of libyaml: the pure parser says it properly)
        return None
    if root is None:
        return None
    resolver = yaml.resolver
    # One Tag object per tag, shared by the nodes that carry it: a Tag formats itself once (node.tag is that
    # text, percent-decoded character by character), and a plain scalar's tag depends on its text alone (one
    # YAML version: no directive), so each distinct text is resolved once.
    shared: dict[tuple[Any, Any], Tag] = {}
    plain: dict[str, Tag] = {}
    stack: list[Node] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, ScalarNode) and not node.style:  # plain: resolved by YAML 1.2's rules
            tag = plain.get(node.value)
            if tag is None:
                found = resolver.resolve(ScalarNode, node.value, (True, False))
                tag = plain[node.value] = shared.setdefault((found.handle, found.suffix), found)
            node.ctag = tag
            continue
        if node.ctag is not None:
            node.ctag = shared.setdefault((node.ctag.handle, node.ctag.suffix), node.ctag)
        if isinstance(node, MappingNode):
            for key, value in node.value:
                stack.extend((key, value))
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)
    return root


def _reused_anchor(message: str, filename: str) -> Diagnostic:
    """ruamel only warns about an anchor defined twice; here it is an error at the second one."""
    anchor = re.search(r"duplicate anchor '([^']*)'", message)
    where = re.findall(r"line (\d+), column (\d+)", message)
    line, col = (int(where[-1][0]), int(where[-1][1])) if where else (1, 1)
    name = anchor.group(1) if anchor else "?"
    return Diagnostic(filename, line, col, f"anchor &{name} is defined twice; give each anchor its own name")


def _mark(node: Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _syntax_error(exc: MarkedYAMLError, filename: str) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = exc.problem or exc.context or "invalid YAML"
    if problem.startswith("but found another document"):
        return Diagnostic(filename, line, col, "a file holds one YAML document; remove this '---' and what follows")
    message = f"YAML syntax error: {problem}"
    if exc.context and exc.problem and exc.context_mark:
        message += f" ({exc.context} at {exc.context_mark.line + 1}:{exc.context_mark.column + 1})"
    hint = _HINTS.get(problem)
    if hint:
        message += f"; {hint}"
    return Diagnostic(filename, line, col, message)


class _TooLarge(Exception):
    def __init__(self, node: Node):
        self.node = node


class _Builder:
    def __init__(self, filename: str, yaml: YAML):
        self.filename = filename
        self.constructor = yaml.constructor
        self.positions = Positions()
        self.diagnostics: list[Diagnostic] = []
        self._seen: set[int] = set()
        self._open: set[int] = set()
        self._alias_depth = 0
        self._alias_values = 0
        self._scalars: dict[tuple[str, str], Any] = {}  # (tag, text) → value, built once

    def error(self, node: Node, message: str) -> None:
        mark = _mark(node)
        self.diagnostics.append(Diagnostic(self.filename, mark.line, mark.col, message))

    def build(self, node: Node, path: Path, depth: int) -> Any:
        try:
            return self._build(node, path, depth)
        except _TooLarge as exc:
            self.error(
                exc.node,
                f"aliases expand to more than {MAX_ALIAS_VALUES} values (a YAML bomb?); "
                "write the values out or use fewer nested aliases",
            )
            return None

    def _build(self, node: Node, path: Path, depth: int) -> Any:
        if depth > MAX_DEPTH:
            self.error(node, f"nested too deeply (more than {MAX_DEPTH} levels)")
            return None
        key = id(node)
        if key in self._open:
            self.error(node, "recursive alias: this value contains itself")
            return None
        is_alias = key in self._seen
        self._seen.add(key)
        self._alias_depth += is_alias
        if self._alias_depth:
            self._alias_values += 1
            if self._alias_values > MAX_ALIAS_VALUES:
                raise _TooLarge(node)
        self._open.add(key)
        tag = node.tag  # a property that formats ruamel's Tag: read once
        try:
            if isinstance(node, MappingNode) and tag == _MAP:
                return self._mapping(node, path, depth)
            if isinstance(node, SequenceNode) and tag == _SEQ:
                return [self._item(item, (*path, i), depth) for i, item in enumerate(node.value)]
            if isinstance(node, ScalarNode) and tag in _SCALARS:
                return self._scalar(node, tag)
            self.error(node, f"unsupported YAML tag {_short(tag)}; write a plain value, list or mapping")
            return None
        finally:
            self._open.discard(key)
            self._alias_depth -= is_alias

    def _item(self, node: Node, path: Path, depth: int) -> Any:
        self.positions.record(path, _mark(node), _mark(node))
        return self._build(node, path, depth + 1)

    def _mapping(self, node: MappingNode, path: Path, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_seen: dict[str, Mark] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                self.error(key_node, "a key must be a plain value (a name), not a list or mapping")
                continue
            name = str(key_node.value)
            key_mark = _mark(key_node)
            if name in first_seen:
                first = first_seen[name]
                self.error(
                    key_node,
                    f"duplicate key {name!r} (first at line {first.line}, column {first.col}); "
                    "each key may appear once in a mapping",
                )
                continue
            first_seen[name] = key_mark
            self.positions.record((*path, name), key_mark, self._value_mark(key_node, value_node))
            out[name] = self._build(value_node, (*path, name), depth + 1)
        for merge in merges:
            self._merge(out, merge, path, depth)
        return out

    def _merge(self, out: dict[str, Any], merge: Node, path: Path, depth: int) -> None:
        sources = merge.value if isinstance(merge, SequenceNode) else [merge]
        for source in sources:
            if not isinstance(source, MappingNode):
                self.error(source, "a merge key (<<) takes a mapping or a list of mappings")
                continue
            merged = self._build(source, path, depth)
            if isinstance(merged, dict):
                for name, value in merged.items():
                    out.setdefault(name, value)

    @staticmethod
    def _value_mark(key_node: Node, value_node: Node) -> Mark:
        # An empty value ("services:" and nothing under it) has no text of its own: point at its key.
        if isinstance(value_node, ScalarNode) and value_node.value == "" and value_node.tag == _NULL:
            return _mark(key_node)
        return _mark(value_node)

    def _scalar(self, node: ScalarNode, tag: str) -> Any:
        if tag == _TIMESTAMP:
            return str(node.value)
        known = (tag, node.value)  # the plain value depends on tag and text alone (ruamel's subclasses aside)
        if known in self._scalars:
            return self._scalars[known]
        value = self.constructor.construct_object(node, deep=True)
        plain: Any
        if value is None or isinstance(value, bool):
            plain = value
        elif isinstance(value, int):
            plain = int(value)
        elif isinstance(value, float):
            plain = float(value)
        else:
            plain = str(value)
        self._scalars[known] = plain
        return plain


def _short(tag: str | None) -> str:
    if tag is None:  # ruamel: a node without a tag (the composer always sets one)
        return "(no tag)"
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag
