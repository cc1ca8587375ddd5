"""A real MLflow server on loopback, and git projects to log runs from.

The server is started once per test session from the project's own venv, with a SQLite
store and proxied artifacts in a temporary folder, exactly as a team's server proxies
them to S3. Git runs with HOME, XDG_CONFIG_HOME and the system config pointed away from
the developer's own, so their settings and credentials can change no result.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).parent / "mlflow"
START_TIMEOUT = 180  # seconds; importing MLflow twice takes 20 s on a busy two-core machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(folder: Path) -> Iterator[str]:
    """Run ``mlflow server`` with its data and log in ``folder``; yield its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        str(MLFLOW),
        "server",
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {
        **os.environ,
        # The job runner serves features these tests do not use, and starts six processes.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # The log is read while the server runs: to count requests, and on a failed start.
        "PYTHONUNBUFFERED": "1",
    }
    with open(folder / "server.log", "wb") as log:
        # Its own session, so that stopping it stops the uvicorn process it starts too.
        server = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, server, folder / "server.log")
        yield url
    finally:
        _stop(server)


def _wait_for_health(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.read().strip() == b"OK":
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer /health in {START_TIMEOUT}s")


def _stop(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """The URL of an MLflow server for the whole session."""
    with running_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture
def git_home(tmp_path, monkeypatch) -> Path:
    """A home directory whose git config has a user and nothing of the developer's."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "0")
    (home / ".gitconfig").write_text(
        "[user]\n\tname = Test Scientist\n\temail = scientist@example.com\n"
        "[init]\n\tdefaultBranch = main\n"
    )
    return home


@pytest.fixture
def tracking_uri(mlflow_server, git_home, monkeypatch) -> str:
    """Point MLflow at the session's server, with no login and no AWS credentials."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(git_home / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(git_home / "no-aws-config"))
    # Off EC2 the metadata service is not there; asking it would reach for the network.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return mlflow_server


def git(cwd: Path, *args: str) -> str:
    """Run git in a test project and return what it printed."""
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


@pytest.fixture
def project(tmp_path, git_home) -> Path:
    """A git repository with one commit: a script, a binary file and a .gitignore."""
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "train.py").write_text("print('training')\n")
    (root / "README.md").write_text("# project\n")
    (root / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (root / ".gitignore").write_text("outputs/\n*.log\n")
    git(root, "init", "--quiet")
    git(root, "add", "--all")
    git(root, "commit", "--quiet", "-m", "Start the project")
    return root
