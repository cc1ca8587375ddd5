"""mlflow-ops for a host you already have: ``fab -H user@host[:port] TASK``.

The same steps as ``invoke deploy`` and ``invoke status``, on the host that
Fabric connects to (``-i KEY`` picks the key). Settings come from
``invoke.yaml`` and ``MLFLOW_OPS_*`` variables as for the Invoke tasks; set
``artifacts_destination`` to keep artifacts somewhere other than the stack's
bucket, for example ``/var/lib/mlflow/artifacts`` on the host itself.
Logins keep their passwords in the stack's SSM parameters, so they need AWS
credentials too; ``MLFLOW_OPS_AUTH=false`` runs the server without them. So
does the stack's self-signed certificate: without AWS, give your own with
``--tls-cert`` and ``--tls-key``.
"""

import functools
import json

import fabric
from invoke import Exit

from ops import config, health
from ops import deploy as deploying
from ops.console import console, reports_errors
from ops.target import of_connection, reconnect

# Long names only: fab's own -h (help) and -H (host) must not be shadowed.
task = functools.partial(fabric.task, auto_shortflags=False)


@task(
    help={
        **config.help_for(
            "mlflow_version",
            "port",
            "https_port",
            "tls_cert",
            "tls_key",
            "workers",
            "jobs",
            "artifacts_destination",
            "ca_bundle",
        ),
        "dry_run": "print the steps the host needs and change nothing",
    }
)
@reports_errors
def deploy(
    c,
    mlflow_version=None,
    port=None,
    https_port=None,
    tls_cert=None,
    tls_key=None,
    workers=None,
    jobs=False,
    artifacts_destination=None,
    ca_bundle=None,
    dry_run=False,
):
    """Install or update MLflow on this host and start it under systemd."""
    settings = config.load(
        None,
        mlflow_version=mlflow_version,
        port=port,
        https_port=https_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        workers=workers,
        jobs=jobs or None,  # not given: the setting decides
        artifacts_destination=artifacts_destination,
        ca_bundle=ca_bundle,
    )
    done = deploying.deploy(of_connection(c, settings), dry_run=dry_run, connector=reconnect(c))
    verb = "would change" if done.dry_run else "changed" if done.changed else "unchanged"
    console.print(f"{c.host}: {verb} ({len(done.steps)} step(s)); MLflow at {done.target.url}")
    console.print(
        f"certificate SHA-256 fingerprint: {done.certificate.fingerprint}", soft_wrap=True
    )


@task(
    help={
        **config.help_for("mlflow_version", "https_port", "artifacts_destination"),
        "json": "print the checks as JSON instead of a table",
    }
)
@reports_errors
def status(c, mlflow_version=None, https_port=None, artifacts_destination=None, json_=False):
    """Check this host's MLflow server end to end."""
    settings = config.load(
        None,
        mlflow_version=mlflow_version,
        https_port=https_port,
        artifacts_destination=artifacts_destination,
    )
    checks = health.status(of_connection(c, settings), connector=reconnect(c))
    if json_:
        print(json.dumps([check.as_dict() for check in checks], indent=2))
    else:
        health.show(checks)
    if any(check.passed is not True for check in checks):
        raise Exit(code=1)
