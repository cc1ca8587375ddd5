"""Reach a stack's server through SSH alone: a local port forwarded to MLflow on the host.

For teams that open no public port at all (``private: true``): the tunnel
ends on the host's loopback, where MLflow listens, so nothing but SSH needs
to be reachable. It lasts until it is interrupted (Ctrl-C).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from ops.aws import Aws
from ops.config import Settings
from ops.console import console, export_lines
from ops.target import Connector, connect, locate, uses_aws

LOCAL_HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCAL_HOST, 0))
        return sock.getsockname()[1]


def tunnel(
    settings: Settings,
    local_port: int | None = None,
    *,
    connector: Connector = connect,
    wait: Callable[[], None] = lambda: time.sleep(3600),
) -> None:
    """Forward ``local_port`` (default: a free one) to MLflow on the host until interrupted."""
    aws = Aws.connect(settings) if uses_aws(settings) else None
    target = locate(settings, aws)
    local_port = local_port or free_port()
    url = f"http://{LOCAL_HOST}:{local_port}"
    with (
        connector(settings, target) as c,
        c.forward_local(
            local_port, remote_port=settings.port, remote_host="127.0.0.1", local_host=LOCAL_HOST
        ),
    ):
        console.print(f"tunnel open: {url} reaches MLflow on {target.ssh_host}; Ctrl-C ends it")
        console.print("use it with these exports and the login of `invoke client-env`:")
        print(export_lines({"MLFLOW_TRACKING_URI": url}), end="", flush=True)
        try:
            while True:
                wait()
        except KeyboardInterrupt:
            console.print("tunnel closed")
