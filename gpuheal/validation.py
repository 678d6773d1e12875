"""pydantic errors as messages a person can read: one line, or one line per error."""

from __future__ import annotations

from pydantic import ValidationError


def error_lines(exc: ValidationError) -> list[str]:
    """``where: what`` for every error (``where`` is the dotted path of the field)."""
    return [f"{_where(e)}: {e['msg']}" for e in exc.errors()]


def first_error(exc: ValidationError) -> str:
    """``where: what (N errors)`` of the first error, in one line."""
    first = exc.errors()[0]
    return f"{_where(first)}: {first.get('msg')} ({exc.error_count()} errors)"


def _where(error: object) -> str:
    loc = error.get("loc", ()) if isinstance(error, dict) else ()
    return ".".join(str(p) for p in loc) or "<root>"
