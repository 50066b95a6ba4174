"""One way every command reports bad input: a red ``error:`` line and a non-zero exit, no traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.markup import escape

from refface.console import console

F = TypeVar("F", bound=Callable[..., object])
# What a command's bad input raises: a wrong value, a missing file, a missing optional dependency.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError)


def exits_on_error(code: int = 2, errors: tuple[type[BaseException], ...] = INPUT_ERRORS) -> Callable[[F], F]:
    """Decorate a typer command: ``errors`` raised inside it print ``error: <message>`` and exit ``code``.

    The message is printed unwrapped and without markup, so it reads (and greps) as the exception says.
    """

    def wrap(command: F) -> F:
        @functools.wraps(command)
        def run(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except errors as e:
                console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
                raise typer.Exit(code) from e

        return run  # type: ignore[return-value]

    return wrap
