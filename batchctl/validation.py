"""One way to say what is wrong with a value pydantic refused: field by field, in words.

Used by the HTTP API (a 400 naming each field), the CLI (one line naming the flag or field)
and the client (what a refused setting is), so the same mistake reads the same everywhere.
"""

from __future__ import annotations

from pydantic import ValidationError


def problems(error: ValidationError) -> list[dict[str, str]]:
    """Each problem as {"field": dotted path or "(body)", "error": pydantic's message}."""
    return [
        {
            "field": ".".join(str(part) for part in problem["loc"]) or "(body)",
            "error": str(problem["msg"]).removeprefix("Value error, "),
        }
        for problem in error.errors()
    ]


def describe(error: ValidationError, *, first_only: bool = False) -> str:
    """The problems as one line: ``field: message; other: message`` (or the first alone)."""
    found = problems(error)
    shown = found[:1] if first_only else found
    return "; ".join(f"{p['field']}: {p['error']}" for p in shown)
