"""What the user sees: one line per phase, a spinner while a phase runs.

Every module prints through ``console`` so that output stays consistent and
``--json`` runs can silence it in one place.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console

console = Console(highlight=False)


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
    detail = f": {', '.join(outcome)}" if outcome else ""
    console.print(f"[green]✓[/green] {title}{detail} [dim]({took:.1f}s)[/dim]")


_notes: list[list[str]] = []


def note(text: str) -> None:
    """Add a word on how the current phase went, shown on its closing line."""
    if _notes:
        _notes[-1].append(text)
    else:
        console.print(f"  {text}")


def show_command(argv: str) -> None:
    """Echo a command that changes the world, before it runs."""
    console.print(f"  [dim]$ {argv}[/dim]", soft_wrap=True)
