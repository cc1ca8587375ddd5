"""What the user sees: one line per phase, a spinner while a phase runs.

Every module prints through ``console`` so that output stays consistent and
``--json`` runs can silence it in one place.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

from invoke.exceptions import Exit
from rich.console import Console
from rich.markup import escape

from ops.errors import OpsError

# Off a terminal (CI logs, pipes) rich would assume 80 columns and cut the
# tables' ids and hints into fragments; COLUMNS still wins where it is set.
# No emoji codes: a fingerprint's ":AB:" or ":CD:" must print as written.
_WIDTH = shutil.get_terminal_size((120, 24)).columns
console = Console(highlight=False, emoji=False, width=_WIDTH)
errors = Console(stderr=True, highlight=False, emoji=False, width=_WIDTH)


@contextlib.contextmanager
def phase(title: str) -> Iterator[None]:
    """Show ``title`` with a spinner while the block runs, then its outcome.

    The block may call ``note`` to say how it ended ("unchanged", "created");
    a failure is marked and re-raised for the task to report.
    """
    started = time.monotonic()
    outcome: list[str] = []
    _notes.append(outcome)
    try:
        with console.status(f"{title} ..."):
            yield
    except BaseException:
        console.print(f"[red]✗[/red] {title}")
        raise
    finally:
        _notes.pop()
    took = time.monotonic() - started
    detail = f": {escape(', '.join(outcome))}" if outcome else ""
    console.print(f"[green]✓[/green] {title}{detail} [dim]({took:.1f}s)[/dim]")


_notes: list[list[str]] = []


def note(text: str) -> None:
    """Add a word on how the current phase went, shown on its closing line."""
    if _notes:
        _notes[-1].append(text)
    else:
        console.print(f"  {escape(text)}")


def show_command(argv: str) -> None:
    """Echo a command that changes the world, before it runs."""
    console.print(f"  [dim]$ {escape(argv)}[/dim]", soft_wrap=True)


def reports_errors(body: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the toolkit's errors into a message, a hint and exit status 1.

    Wraps a task body; Invoke still sees the body's own signature.
    """

    @functools.wraps(body)
    def task_body(*args: Any, **kwargs: Any) -> Any:
        try:
            return body(*args, **kwargs)
        except OpsError as exc:
            errors.print(f"[red]error:[/red] {exc.message}", soft_wrap=True)
            if exc.hint:
                errors.print(f"[yellow]hint:[/yellow] {exc.hint}", soft_wrap=True)
            raise Exit(code=1) from None
        except KeyboardInterrupt:
            errors.print("[red]interrupted[/red]: run the same command again to finish")
            raise Exit(code=130) from None

    return task_body


def confirm(question: str) -> bool:
    """Ask a yes/no question; no terminal or no answer means no."""
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in {"y", "yes"}


def export_lines(variables: dict[str, str]) -> str:
    """Shell ``export`` lines, quoted, for ``eval "$(invoke ...)"``."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())
