"""A small Bicep reader: what the infra tests understand of infra/*.bicep.

No Bicep compiler can run here (``az bicep install`` downloads one), so this reads just
enough Bicep for the checks a reviewer would make: comments, strings (with ``${...}``
interpolation holes), brace-matched bodies, ``key: value`` entries, arrays, ``resource`` and
``module`` declarations, params, vars and outputs, the resolution of literal values, and the
identifiers a file uses but never declares. Every infra test reads Bicep through it, so a
case it misreads is fixed once (``test_reader_understands_the_bicep_it_meets`` holds the
tricky ones).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = [
    "BicepFile",
    "Declaration",
    "Param",
    "array_items",
    "code_only",
    "dig",
    "entries",
    "inner",
    "literal",
    "match_close",
    "read_bicep",
    "read_declarations",
    "skip_hole",
    "skip_string",
    "strip_comments",
    "undeclared_identifiers",
    "value_end",
]

_OPENERS = {"{": "}", "[": "]", "(": ")"}
_CLOSERS = set(_OPENERS.values())


def skip_string(text: str, i: int) -> int:
    """Index just past the string literal starting at ``text[i] == "'"``."""
    if text.startswith("'''", i):
        end = text.find("'''", i + 3)
        return len(text) if end < 0 else end + 3
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text.startswith("${", j):
            # An interpolation hole may hold strings of its own: '${replace(x, '_', '-')}'.
            j = skip_hole(text, j + 2)
            continue
        if text[j] == "'":
            return j + 1
        j += 1
    return j


def skip_hole(text: str, j: int) -> int:
    """Index just past the ``}`` closing an interpolation hole whose body starts at ``j``."""
    depth = 0
    while j < len(text):
        if text[j] == "'":
            j = skip_string(text, j)
            continue
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return j + 1
            depth -= 1
        j += 1
    return j


def strip_comments(text: str) -> str:
    """Blank out // and /* */ comments (keeping line breaks), leaving strings alone."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "'":
            j = skip_string(text, i)
            out.append(text[i:j])
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = len(text) if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = len(text) if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def match_close(text: str, i: int) -> int:
    """Index of the bracket closing the one at ``text[i]``, skipping strings and nesting."""
    depth = 0
    j = i
    while j < len(text):
        char = text[j]
        if char == "'":
            j = skip_string(text, j)
            continue
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise ValueError(f"unbalanced bracket at offset {i}")


def value_end(text: str, i: int, stops: str) -> int:
    """Index of the first of ``stops`` at or after ``i`` that is outside strings and brackets
    (a value may span lines inside its braces), or the end of ``text``."""
    while i < len(text) and text[i] not in stops:
        if text[i] == "'":
            i = skip_string(text, i)
        elif text[i] in _OPENERS:
            i = match_close(text, i) + 1
        else:
            i += 1
    return i


def entries(body: str) -> dict[str, str]:
    """The ``key: value`` entries at the top level of an object body (between its braces)."""
    found: dict[str, str] = {}
    i = 0
    while i < len(body):
        while i < len(body) and body[i] in " \t\r\n,":
            i += 1
        if i >= len(body):
            break
        if body[i] == "'":
            end = skip_string(body, i)
            key = body[i + 1 : end - 1]
            i = end
        else:
            key_match = re.match(r"[A-Za-z_$][\w$-]*", body[i:])
            if not key_match:
                raise ValueError(f"cannot read an object key at {body[i : i + 40]!r}")
            key = key_match.group(0)
            i += len(key)
        colon = re.match(r"\s*:\s*", body[i:])
        if not colon:
            raise ValueError(f"no ':' after key {key!r}")
        i += colon.end()
        start = i
        i = value_end(body, i, "\n")
        found[key] = body[start:i].strip()
    return found


def inner(value: str) -> str:
    """The body of an object or array literal."""
    value = value.strip()
    assert value[:1] in "{[" and match_close(value, 0) == len(value) - 1, value
    return value[1:-1]


def dig(body: str, dotted: str) -> str | None:
    """The value at a dotted path of nested objects, e.g. ``properties.allowSharedKeyAccess``."""
    value: str | None = None
    for part in dotted.split("."):
        table = entries(body)
        if part not in table:
            return None
        value = table[part]
        if value.startswith("{"):
            body = inner(value)
    return value


def array_items(value: str) -> list[str]:
    """The items of a multi-line array literal."""
    items: list[str] = []
    body = inner(value)
    i = 0
    while i < len(body):
        while i < len(body) and body[i] in " \t\r\n,":
            i += 1
        start = i
        i = value_end(body, i, "\n,")
        if body[start:i].strip():
            items.append(body[start:i].strip())
    return items


def literal(value: str | None) -> str | None:
    """The text of a plain single-quoted string literal (no interpolation), else None."""
    if value and re.fullmatch(r"'[^'$]*'", value):
        return value[1:-1]
    return None


@dataclass(frozen=True)
class Declaration:
    """A ``resource`` or ``module`` declaration."""

    kind: str
    symbol: str
    target: str
    existing: bool
    condition: str | None
    body: str

    @property
    def type(self) -> str:
        return self.target.split("@", 1)[0]

    def get(self, dotted: str) -> str | None:
        return dig(self.body, dotted)


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | None


@dataclass(frozen=True)
class BicepFile:
    """One .bicep file as far as these tests need to understand it."""

    path: Path
    raw: str
    text: str
    declarations: tuple[Declaration, ...]
    params: dict[str, Param]
    variables: dict[str, str]
    outputs: dict[str, str]

    def resources(self, type_: str | None = None) -> list[Declaration]:
        return [
            d
            for d in self.declarations
            if d.kind == "resource" and (type_ is None or d.type == type_)
        ]

    def modules(self) -> list[Declaration]:
        return [d for d in self.declarations if d.kind == "module"]

    def symbol(self, name: str) -> Declaration:
        matches = [d for d in self.declarations if d.symbol == name]
        assert len(matches) == 1, f"{self.path.name}: no single declaration named {name!r}"
        return matches[0]

    def resolve(self, value: str | None, given: dict[str, str] | None = None) -> str | None:
        """Evaluate a literal, a var/param reference, string() or an interpolated string."""
        if value is None:
            return None
        value = value.strip()
        given = given or {}
        if value in given:
            return given[value]
        if re.fullmatch(r"[A-Za-z_]\w*", value):
            if value in self.variables:
                return self.resolve(self.variables[value], given)
            if value in self.params and self.params[value].default is not None:
                return self.resolve(self.params[value].default, given)
            return None
        wrapped = re.fullmatch(r"string\((\w+)\)", value)
        if wrapped:
            return self.resolve(wrapped.group(1), given)
        if value.startswith("'") and value.endswith("'") and "\n" not in value:
            parts: list[str] = []
            pos = 1
            for hole in re.finditer(r"\$\{([^}]*)\}", value):
                parts.append(value[pos : hole.start()])
                resolved = self.resolve(hole.group(1), given)
                if resolved is None:
                    return None
                parts.append(resolved)
                pos = hole.end()
            parts.append(value[pos:-1])
            return "".join(parts)
        if re.fullmatch(r"-?\d+|true|false", value):
            return value
        return None


_DECLARATION = re.compile(
    r"^[ \t]*(resource|module)[ \t]+(\w+)[ \t]+'([^']+)'[ \t]*(existing[ \t]*)?=[ \t]*",
    re.MULTILINE,
)


def read_declarations(text: str) -> Iterator[Declaration]:
    for match in _DECLARATION.finditer(text):
        i = match.end()
        condition = None
        if text.startswith("if", i):
            open_paren = text.index("(", i)
            close_paren = match_close(text, open_paren)
            condition = text[open_paren + 1 : close_paren].strip()
            i = close_paren + 1
        open_brace = text.index("{", i)
        assert not text[i:open_brace].strip(), f"unexpected {text[i:open_brace]!r}"
        body = text[open_brace + 1 : match_close(text, open_brace)]
        yield Declaration(
            kind=match.group(1),
            symbol=match.group(2),
            target=match.group(3),
            existing=bool(match.group(4)),
            condition=condition,
            body=body,
        )


def _top_level_statements(text: str, keyword: str) -> Iterator[tuple[str, str]]:
    """(name, rest) for each top-level ``keyword name rest`` statement, rest brace-complete."""
    for match in re.finditer(rf"^{keyword}[ \t]+(\w+)[ \t]+", text, re.MULTILINE):
        start = match.end()
        yield match.group(1), text[start : value_end(text, start, "\n")].strip()


@cache
def read_bicep(path: Path) -> BicepFile:
    raw = path.read_text()
    text = strip_comments(raw)
    params: dict[str, Param] = {}
    for name, rest in _top_level_statements(text, "param"):
        type_, _, default = rest.partition("=")
        params[name] = Param(name, type_.strip(), default.strip() or None)
    variables = {
        name: rest.partition("=")[2].strip() for name, rest in _top_level_statements(text, "var")
    }
    outputs = {
        name: rest.partition("=")[2].strip() for name, rest in _top_level_statements(text, "output")
    }
    return BicepFile(
        path=path,
        raw=raw,
        text=text,
        declarations=tuple(read_declarations(text)),
        params=params,
        variables=variables,
        outputs=outputs,
    )


# Identifiers: what a compiler would refuse as undeclared

_BICEP_WORDS = {"true", "false", "null", "for", "in", "if", "existing"}
_BICEP_TYPES = r"(?:string|int|bool|object|array)"


def code_only(text: str) -> str:
    """The text with each string literal replaced by the code in its ``${...}`` holes."""
    kept: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "'":
            kept.append(text[i])
            i += 1
            continue
        end = skip_string(text, i)
        j = i + 1
        while j < end - 1:
            if text.startswith("${", j):
                close = skip_hole(text, j + 2)
                kept.append(" " + code_only(text[j + 2 : close - 1]) + " ")
                j = close
            else:
                j += 1
        kept.append(" ")
        i = end
    return "".join(kept)


def undeclared_identifiers(bicep: BicepFile) -> set[str]:
    """Names used as values that no param, var, resource, module or loop declares."""
    code = code_only(bicep.text)
    code = re.sub(r"^\s*@\w+", " ", code, flags=re.MULTILINE)
    code = re.sub(rf"^(?:param|var|output)\s+\w+(?:\s+{_BICEP_TYPES})?", " ", code, flags=re.M)
    code = re.sub(r"^\s*(?:resource|module)\s+\w+", " ", code, flags=re.MULTILINE)
    code = re.sub(r"^targetScope", " ", code, flags=re.MULTILINE)
    declared = set(bicep.params) | set(bicep.variables) | {d.symbol for d in bicep.declarations}
    declared |= set(re.findall(r"\bfor\s+(\w+)\s+in\b", code))
    # A value is an identifier not after '.', and not an object key or a function name.
    used = set(re.findall(r"(?<![\w.$])([A-Za-z_]\w*)\b(?!\s*[:(])", code))
    return used - declared - _BICEP_WORDS
