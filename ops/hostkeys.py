"""SSH host keys: trusted on first use, then pinned.

The first connection to a host keeps its key in ``known_hosts()``, in
OpenSSH's format; every later connection must present that key or is
refused. A released address is forgotten, so the next machine to get it is
met as new.
"""

from __future__ import annotations

from pathlib import Path

from fabric import Connection
from paramiko import AutoAddPolicy
from paramiko.hostkeys import HostKeys
from paramiko.ssh_exception import AuthenticationException, BadHostKeyException, SSHException

from ops.config import user_dir
from ops.console import errors
from ops.errors import OpsError


def known_hosts() -> Path:
    """Where the host keys of the hosts mlflow-ops has reached are pinned."""
    return user_dir() / "known_hosts"


class _PinOnFirstUse(AutoAddPolicy):
    """Keep a host's key the first time it is seen, and say so."""

    def missing_host_key(self, client, hostname, key):
        super().missing_host_key(client, hostname, key)
        # On standard error, as ssh says it: standard output may be JSON.
        errors.print(
            f"  first connection to {hostname}: pinned its host key {key.fingerprint}",
            soft_wrap=True,
        )


def open_pinned(connection: Connection) -> Connection:
    """Open ``connection``, accepting a host's key on first use and only that key after.

    An unreachable host, a refused key or a changed host key is an
    ``OpsError`` that says which, with a hint.
    """
    path = known_hosts()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    connection.client.load_host_keys(str(path))
    connection.client.set_missing_host_key_policy(_PinOnFirstUse())
    where = _known_name(connection.host, connection.port)
    login = f"ssh -p {connection.port} {connection.user}@{connection.host}"
    try:
        connection.open()
    except BadHostKeyException as exc:
        raise OpsError(
            f"the SSH host key of {where} is {exc.key.fingerprint}, not the "
            f"{exc.expected_key.fingerprint} pinned in {path}: another machine answers at this "
            "address, or the instance was replaced",
            hint=f"if it was replaced, forget the old key with `ssh-keygen -R '{where}' -f {path}`",
        ) from None
    except AuthenticationException:
        raise OpsError(
            f"{where} refused the SSH key for user {connection.user}",
            hint="check --ssh-user and --ssh-key: the instance trusts the key pair provision "
            "imported from the key's .pub",
        ) from None
    except (SSHException, OSError) as exc:
        raise OpsError(
            f"cannot reach SSH at {where}: {exc}",
            hint=f"is the host up, and SSH open to your address (allowed_cidr)? try `{login}`",
        ) from None
    return connection


def forget(host: str, port: int) -> None:
    """Drop a host's pinned key, when the machine behind the address is gone."""
    path = known_hosts()
    if not path.is_file():
        return
    keys = HostKeys(str(path))
    name = _known_name(host, port)
    if name in keys:
        del keys[name]
        keys.save(str(path))


def _known_name(host: str, port: int) -> str:
    """A host's name in a known_hosts file, as OpenSSH writes it."""
    return host if port == 22 else f"[{host}]:{port}"
