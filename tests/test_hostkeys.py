"""Pinned SSH host keys: the file, forgetting, and the errors of opening a connection.

A changed key against a real sshd is tested end to end, on the sandbox's guest.
"""

import socket
import subprocess
from pathlib import Path

import pytest
from fabric import Connection

from ops import hostkeys
from ops.errors import OpsError


def public_key(folder: Path, name: str) -> str:
    key = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return " ".join(key.with_suffix(".pub").read_text().split()[:2])


def test_the_file_lives_in_the_operators_config_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert hostkeys.known_hosts() == tmp_path / "mlflow-ops" / "known_hosts"


def test_forgetting_an_address_drops_its_key_alone(tmp_path):
    known = hostkeys.known_hosts()
    known.parent.mkdir(parents=True)
    first, second = public_key(tmp_path, "first"), public_key(tmp_path, "second")
    known.write_text(f"203.0.113.7 {first}\n[127.0.0.1]:2222 {second}\n")

    hostkeys.forget("203.0.113.7", 22)
    hostkeys.forget("198.51.100.1", 22)  # never pinned: nothing to do

    assert known.read_text().splitlines() == [f"[127.0.0.1]:2222 {second}"]


def test_an_unreachable_host_is_named_with_a_hint_to_try_ssh():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(OpsError, match=rf"cannot reach SSH at \[127.0.0.1\]:{port}") as raised:
        hostkeys.open_pinned(Connection("127.0.0.1", user="admin", port=port, connect_timeout=2))
    assert f"ssh -p {port} admin@127.0.0.1" in raised.value.hint
    assert hostkeys.known_hosts().read_text() == ""  # nothing pinned
