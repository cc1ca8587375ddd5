"""Where a stack's server runs and how to reach it.

This is the one place that joins the settings, the stack's AWS resources and
an SSH connection: the host steps in ``ops.host`` know nothing of AWS, and
``ops.provision`` knows nothing of SSH beyond waiting for it to answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fabric import Config, Connection

from ops.aws import Aws
from ops.config import ARTIFACT_PREFIX, Settings
from ops.errors import OpsError
from ops.hostkeys import open_pinned
from ops.provision import describe, ssh_address


@dataclasses.dataclass(frozen=True)
class Target:
    """A running stack's server as clients and the operator reach it."""

    ssh_user: str
    ssh_host: str
    ssh_port: int
    address: str
    port: int
    artifacts_destination: str
    bucket: str | None = None
    public_address: str | None = None
    https_port: int = 443

    @property
    def url(self) -> str:
        """Where clients reach the server: nginx, over TLS."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}" if self.https_port == 443 else f"https://{host}:{self.https_port}"

    @property
    def tls_names(self) -> list[str]:
        """The names a self-signed certificate is made for."""
        names = (self.address, self.public_address, "localhost", "127.0.0.1")
        return list(dict.fromkeys(name for name in names if name))

    @property
    def ssh(self) -> str:
        return f"{self.ssh_user}@{self.ssh_host}:{self.ssh_port}"

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        # MLflow answers 403 to a Host header it does not know. nginx passes
        # on the client's: the address, bare or with the HTTPS port. Through
        # `invoke tunnel` it is localhost with whichever local port was free.
        suffixes = ("", f":{self.https_port}", f":{self.port}")
        allowed = [f"{name}{suffix}" for name in self.tls_names for suffix in suffixes]
        return tuple(dict.fromkeys([*allowed, "localhost:*", "127.0.0.1:*"]))


# Opens a new SSH connection to a stack's host; tests and `fab -H` pass their own.
Connector = Callable[[Settings, Target], Connection]


def uses_aws(settings: Settings) -> bool:
    """Whether the stack needs AWS: for its instance, its bucket or its secrets."""
    return settings.ssh is None or settings.artifacts_destination is None or settings.auth


def locate(settings: Settings, aws: Aws | None = None) -> Target:
    """Find the stack's server: the ``ssh`` setting, else its instance in AWS.

    AWS is asked only for what the settings leave open: a host given with
    ``--host`` and an explicit ``artifacts_destination`` need no AWS at all.
    """
    state = None
    if uses_aws(settings):
        aws = aws or Aws.connect(settings)
        state = describe(settings, aws)

    if settings.ssh is None and state.instance_state != "running":
        raise OpsError(
            f"stack '{settings.stack}' has no running instance ({state.instance_state or 'none'})",
            hint="run `invoke provision`, or give a host with --host user@address[:port]",
        )
    user, address, ssh_port = ssh_address(settings, state.public_address if state else None)

    if settings.artifacts_destination is not None:
        destination, bucket = settings.artifacts_destination, None
    else:
        bucket = state.bucket
        destination = f"s3://{bucket}/{ARTIFACT_PREFIX}"
    return Target(
        ssh_user=user,
        ssh_host=address,
        ssh_port=ssh_port,
        address=address,
        port=settings.port,
        https_port=settings.https_port,
        artifacts_destination=destination,
        bucket=bucket,
        public_address=state.public_address if state else None,
    )


def connect(settings: Settings, target: Target) -> Connection:
    """Open an SSH connection with the stack's key and nothing else.

    Neither the user's agent nor other keys in ``~/.ssh`` are tried, and no
    ``~/.ssh/config`` is read: the connection is the same for every teammate.
    """
    key = settings.ssh_key
    if not key.is_file():
        raise OpsError(
            f"SSH key {key} not found",
            hint=f"create one with `ssh-keygen -t ed25519 -f {key}` or set --ssh-key",
        )
    connection = Connection(
        target.ssh_host,
        user=target.ssh_user,
        port=target.ssh_port,
        config=Config(overrides={"load_ssh_configs": False}),
        connect_timeout=15,
        connect_kwargs={
            "key_filename": str(key),
            "look_for_keys": False,
            "allow_agent": False,
        },
    )
    return open_pinned(connection)


def reconnect(c: Connection) -> Connector:
    """A connector that opens new connections like ``c`` (for ``fab -H``)."""

    def connector(settings: Settings, target: Target) -> Connection:
        return open_pinned(
            Connection(
                c.host, user=c.user, port=c.port, config=c.config, connect_kwargs=c.connect_kwargs
            )
        )

    return connector


def of_connection(c: Connection, settings: Settings) -> Settings:
    """The settings with ``ssh`` pointing at the host of a Fabric connection."""
    return settings.replace(ssh=f"{c.user}@{c.host}:{c.port}")
