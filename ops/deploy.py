"""Deploy: bring a stack's host to the configured release and prove it answers."""

from __future__ import annotations

import dataclasses

from ops import health, host, logins, tls
from ops.aws import Aws
from ops.config import Settings
from ops.console import console, note, phase
from ops.errors import OpsError
from ops.target import Connector, Target, connect, locate, uses_aws


def release_for(
    settings: Settings,
    target: Target,
    secrets: logins.ServerSecrets | None = None,
    certificate: tls.Certificate | None = None,
) -> host.Release:
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
        jobs=settings.jobs,
        allowed_hosts=target.allowed_hosts,
        artifacts_destination=target.artifacts_destination,
        server_env=settings.server_env,
        ca_bundle=ca_bundle,
        backup_keep=settings.backup_keep,
        backup_schedule=settings.backup_schedule,
        secrets=secrets,
        # Behind nginx, MLflow listens on loopback alone.
        bind="127.0.0.1" if certificate else "0.0.0.0",
        tls_cert=certificate.cert_pem if certificate else None,
        tls_key=certificate.key_pem if certificate else None,
        https_port=settings.https_port,
    )


def server_secrets(
    settings: Settings, aws: Aws | None, *, dry_run: bool
) -> logins.ServerSecrets | None:
    """The stack's secrets for a server with logins; a dry run creates none."""
    if not settings.auth:
        return None
    if aws is None:
        raise OpsError(
            "logins need the stack's secrets in SSM, and no AWS account is configured",
            hint="give AWS credentials for the stack, or set auth: false",
        )
    if dry_run:
        return logins.read(settings, aws) or logins.ServerSecrets("(new)", "(new)")
    return logins.ensure(settings, aws)


def certificate(
    settings: Settings, aws: Aws | None, target: Target, *, dry_run: bool
) -> tls.Certificate:
    """The certificate to serve, checked; a dry run stores no new self-signed one."""
    if dry_run and settings.tls_cert is None and aws is not None:
        return tls.stored(settings, aws) or tls.generate(target.tls_names)
    return tls.for_deploy(settings, aws, target.tls_names, target.public_address)


@dataclasses.dataclass(frozen=True)
class Deployed:
    target: Target
    steps: list[str]
    dry_run: bool = False

    certificate: tls.Certificate | None = None

    @property
    def changed(self) -> bool:
        return bool(self.steps)


def deploy(
    settings: Settings,
    *,
    dry_run: bool = False,
    connector: Connector = connect,
) -> Deployed:
    """Bring the stack's host to the configured release, then check it answers."""
    aws = Aws.connect(settings) if uses_aws(settings) else None
    target = locate(settings, aws)
    # A certificate nginx would refuse is refused here, before the host is touched.
    served = certificate(settings, aws, target, dry_run=dry_run)
    secrets = server_secrets(settings, aws, dry_run=dry_run)
    release = release_for(settings, target, secrets, served)
    with phase(f"Reading the state of {target.ssh}"), connector(settings, target) as c:
        steps = host.plan(release, host.probe(c, release))

    if dry_run:
        for step in steps:
            console.print(f"  would {step.title}")
        return Deployed(target, [step.title for step in steps], dry_run=True, certificate=served)

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
        admin = (logins.ADMIN_USER, secrets.admin_password) if secrets else None
        verify = tls.verify_for(settings, aws)
        health.wait_until_ready(target.url, settings.mlflow_version, login=admin, verify=verify)
    if secrets is not None:
        with phase("Checking MLflow's old default admin password is refused"):
            if logins.retire_legacy_password(target.url, secrets.admin_password, verify):
                note("it was accepted: replaced with the stack's admin password")
    return Deployed(target, [step.title for step in steps], certificate=served)
