"""Fixtures for the local sandbox: one sandbox for the whole session, and its environment.

The sandbox comes up in a temporary state directory, never the developer's own
``.sandbox``, and goes down at the end of the session. Tests that need it are
skipped on a machine that cannot run it (not Linux, not root, no nspawn).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import ops.sandbox
from ops.errors import OpsError


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ops.sandbox.Sandbox]:
    """A running sandbox: moto and a booted Debian guest, taken down after the session."""
    try:
        ops.sandbox.check_host()
    except OpsError as exc:
        pytest.skip(f"this machine cannot run the sandbox: {exc.message}")
    state_dir = tmp_path_factory.mktemp("sandbox")
    with pytest.MonkeyPatch.context() as patch:
        # down() forgets the guest's host key and certificate: in files of the session's own.
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
        try:
            yield ops.sandbox.up(state_dir)
        finally:
            recorded = ops.sandbox.load(state_dir)
            started = recorded.processes() if recorded else []
            ops.sandbox.down(state_dir)
    assert [process for process in started if process.alive()] == []


@pytest.fixture(scope="session")
def sandbox_env(
    sandbox: ops.sandbox.Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The environment for a subprocess that works against the sandbox.

    Inherited ``AWS_*`` and ``MLFLOW_*`` variables are dropped, and ``HOME`` is
    an empty directory holding the configuration too, so nothing reads the
    developer's ``~/.ssh``, ``~/.aws`` or pinned host keys. ``XDG_CACHE_HOME``
    keeps pointing at the real caches, so a subprocess reuses the root
    filesystem and the wheels instead of fetching them again.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "MLFLOW_"))
    }
    env.update(ops.sandbox.env_vars(sandbox))
    env["HOME"] = str(tmp_path_factory.mktemp("home"))
    env["XDG_CONFIG_HOME"] = str(Path(env["HOME"]) / ".config")
    env["XDG_CACHE_HOME"] = str(ops.sandbox.cache_home().parent)
    return env
