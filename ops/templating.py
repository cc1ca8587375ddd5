"""Render the files in ``templates/`` with Jinja2.

Templates are rendered on the operator's machine and uploaded as finished
files, so a host never needs Jinja2 and a dry run can show exact content.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def env_value(value: Any) -> str:
    """Quote a value for a systemd environment file.

    systemd reads such files with shell-like rules: double quotes with
    backslash escapes keep spaces and special characters intact.
    """
    text = str(value)
    if _PLAIN.match(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def exec_arg(value: Any) -> str:
    """Quote one word of a unit's ``ExecStart`` line.

    As in an environment file, plus ``%`` doubled: systemd expands
    specifiers such as ``%h`` in command lines.
    """
    return env_value(str(value).replace("%", "%%"))


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["env_value"] = env_value
    env.filters["exec_arg"] = exec_arg
    return env


def render(name: str, **context: Any) -> str:
    """Render ``templates/<name>`` with ``context``; a missing value is an error."""
    return _environment().get_template(name).render(**context)
