"""Deploy: bring a stack's host to the configured release and prove it answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fabric import Connection

from ops import health, host
from ops.config import Settings
from ops.console import console, phase
from ops.errors import OpsError
from ops.target import Target, connect, locate


def release_for(settings: Settings, target: Target) -> host.Release:
    """What the host should run, from the settings and where it lives."""
    ca_bundle = None
    if settings.ca_bundle is not None:
        if not settings.ca_bundle.is_file():
            raise OpsError(f"CA bundle {settings.ca_bundle} not found", hint="check --ca-bundle")
        ca_bundle = settings.ca_bundle.read_text()
    return host.Release(
        stack=settings.stack,
        mlflow_version=settings.mlflow_version,
        port=settings.port,
        workers=settings.workers,
        allowed_hosts=target.allowed_hosts,
        artifacts_destination=target.artifacts_destination,
        server_env=settings.server_env,
        ca_bundle=ca_bundle,
        backup_keep=settings.backup_keep,
        backup_schedule=settings.backup_schedule,
    )


@dataclasses.dataclass(frozen=True)
class Deployed:
    target: Target
    steps: list[str]
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.steps)


def deploy(
    settings: Settings,
    *,
    dry_run: bool = False,
    connector: Callable[[Settings, Target], Connection] = connect,
) -> Deployed:
    """Bring the stack's host to the configured release, then check it answers."""
    target = locate(settings)
    release = release_for(settings, target)
    with phase(f"Reading the state of {target.ssh}"), connector(settings, target) as c:
        steps = host.plan(release, host.probe(c, release))

    if dry_run:
        for step in steps:
            console.print(f"  would {step.title}")
        return Deployed(target, [step.title for step in steps], dry_run=True)

    if steps:
        with phase(f"Deploying MLflow {settings.mlflow_version}"), connector(settings, target) as c:
            host.apply(c, steps)

    # Judge the result from a new connection, as a teammate would see it.
    with phase(f"Waiting for {target.url} to answer"), connector(settings, target) as c:
        facts = host.probe(c)
        if facts["unit"].get("ActiveState") not in {"active", "activating"}:
            raise OpsError(
                f"the {host.SERVICE} unit is {facts['unit'].get('ActiveState')}",
                hint=f"see `sudo journalctl -u {host.SERVICE}` on the host",
            )
        health.wait_until_ready(target.url, settings.mlflow_version)
    return Deployed(target, [step.title for step in steps])
