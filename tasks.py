"""mlflow-ops: an MLflow Tracking Server on AWS that stays healthy.

Run ``invoke --list`` for the tasks and ``invoke --help TASK`` for a task's
arguments. Every argument that names a setting overrides the environment
variable ``MLFLOW_OPS_<SETTING>``, which overrides ``invoke.yaml``.
"""

import functools
import json
from pathlib import Path

import invoke
from invoke import Collection, Exit

from ops import backup as backups
from ops import config, health, logins, sandbox
from ops import deploy as deploying
from ops import provision as provisioning
from ops import tunnel as tunnelling
from ops.console import confirm, console, export_lines, reports_errors
from ops.errors import OpsError

# Long names only: one-letter flags made up from many similar names confuse.
task = functools.partial(invoke.task, auto_shortflags=False)

# The arguments shared by the tasks that act on a stack.
STACK = config.help_for("stack", "region")
HOST = {
    "host": config.SETTINGS["ssh"].help + " (setting: ssh)",
    **config.help_for("ssh_user", "ssh_key"),
}


@task(
    help={
        **STACK,
        **config.help_for(
            "instance_type",
            "ami",
            "volume_size",
            "allowed_cidr",
            "ssh_key",
            "bucket",
            "port",
            "https_port",
            "private",
        ),
        "host": "wait for SSH at this address instead of the instance's: user@address[:port]",
        "dry_run": "print the plan and change nothing",
    }
)
@reports_errors
def provision(
    c,
    stack=None,
    region=None,
    instance_type=None,
    ami=None,
    volume_size=None,
    allowed_cidr=None,
    ssh_key=None,
    bucket=None,
    port=None,
    https_port=None,
    private=False,
    host=None,
    dry_run=False,
):
    """Create the stack in AWS, or find and reuse what exists."""
    settings = config.load(
        c.config,
        stack=stack,
        region=region,
        instance_type=instance_type,
        ami=ami,
        volume_size=volume_size,
        allowed_cidr=allowed_cidr,
        ssh_key=ssh_key,
        bucket=bucket,
        port=port,
        https_port=https_port,
        private=private or None,  # not given: the setting decides
        ssh=host,
    )
    provisioning.provision(settings, dry_run=dry_run)


@task(
    help={
        **STACK,
        **HOST,
        **config.help_for(
            "mlflow_version",
            "port",
            "https_port",
            "tls_cert",
            "tls_key",
            "workers",
            "jobs",
            "bucket",
            "artifacts_destination",
            "ca_bundle",
        ),
        "dry_run": "print the steps the host needs and change nothing",
    }
)
@reports_errors
def deploy(
    c,
    stack=None,
    region=None,
    host=None,
    ssh_user=None,
    ssh_key=None,
    mlflow_version=None,
    port=None,
    https_port=None,
    tls_cert=None,
    tls_key=None,
    workers=None,
    jobs=False,
    bucket=None,
    artifacts_destination=None,
    ca_bundle=None,
    dry_run=False,
):
    """Install or update MLflow on the stack's host, behind nginx with TLS, under systemd."""
    settings = config.load(
        c.config,
        stack=stack,
        region=region,
        ssh=host,
        ssh_user=ssh_user,
        ssh_key=ssh_key,
        mlflow_version=mlflow_version,
        port=port,
        https_port=https_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        workers=workers,
        jobs=jobs or None,  # not given: the setting decides
        bucket=bucket,
        artifacts_destination=artifacts_destination,
        ca_bundle=ca_bundle,
    )
    done = deploying.deploy(settings, dry_run=dry_run)
    kind = "self-signed certificate" if done.certificate.self_signed else "certificate"
    console.print(f"{kind} SHA-256 fingerprint: {done.certificate.fingerprint}", soft_wrap=True)
    if done.dry_run:
        console.print(f"dry run: {len(done.steps)} step(s) would change {done.target.ssh}")
    elif done.changed:
        console.print(f"MLflow {settings.mlflow_version} is serving at {done.target.url}")
    else:
        console.print(f"unchanged: MLflow {settings.mlflow_version} at {done.target.url}")


@task(
    help={
        **STACK,
        **HOST,
        **config.help_for("mlflow_version", "https_port", "bucket", "artifacts_destination"),
        "json": "print the checks as JSON instead of a table",
    }
)
@reports_errors
def status(
    c,
    stack=None,
    region=None,
    host=None,
    ssh_user=None,
    ssh_key=None,
    mlflow_version=None,
    https_port=None,
    bucket=None,
    artifacts_destination=None,
    json_=False,
):
    """Check the stack end to end; exit non-zero naming what failed."""
    settings = config.load(
        c.config,
        stack=stack,
        region=region,
        ssh=host,
        ssh_user=ssh_user,
        ssh_key=ssh_key,
        mlflow_version=mlflow_version,
        https_port=https_port,
        bucket=bucket,
        artifacts_destination=artifacts_destination,
    )
    checks = health.status(settings)
    if json_:
        print(json.dumps([check.as_dict() for check in checks], indent=2))
    else:
        health.show(checks)
    failed = [check.name for check in checks if check.passed is False]
    skipped = [check.name for check in checks if check.passed is None]
    if failed or skipped:
        summary = f"failed: {', '.join(failed)}" if failed else ""
        if skipped:
            summary += f"{'; ' if failed else ''}skipped: {', '.join(skipped)}"
        raise Exit(f"status: not healthy ({summary})", code=1)


@task(
    help={**STACK, **HOST, "keep": config.SETTINGS["backup_keep"].help + " (setting: backup_keep)"}
)
@reports_errors
def backup(c, stack=None, region=None, host=None, ssh_user=None, ssh_key=None, keep=None):
    """Back up the metadata store on the host, verify it and store it in the bucket."""
    settings = config.load(
        c.config, stack=stack, region=region, ssh=host, ssh_user=ssh_user, ssh_key=ssh_key,
        backup_keep=keep,
    )  # fmt: skip
    console.print(backups.describe(backups.take(settings)), soft_wrap=True)


@task(help={**STACK, **HOST, "json": "print the backups as JSON instead of a table"})
@reports_errors
def backups_(c, stack=None, region=None, host=None, ssh_user=None, ssh_key=None, json_=False):
    """List the stored backups: time, size, MLflow version, row counts, verified."""
    settings = config.load(
        c.config, stack=stack, region=region, ssh=host, ssh_user=ssh_user, ssh_key=ssh_key
    )
    found = backups.stored(settings)
    if json_:
        print(json.dumps([backup.as_dict() for backup in found], indent=2))
    else:
        backups.show(found)


@task(
    help={
        **STACK,
        **HOST,
        **config.help_for("mlflow_version", "port"),
        "backup": "the backup to restore: an id from `invoke backups`, or latest (the default)",
        "yes": "do not ask for confirmation",
    }
)
@reports_errors
def restore(
    c,
    stack=None,
    region=None,
    host=None,
    ssh_user=None,
    ssh_key=None,
    mlflow_version=None,
    port=None,
    backup="latest",
    yes=False,
):
    """Restore the metadata store from a verified backup; the server stops meanwhile."""
    settings = config.load(
        c.config, stack=stack, region=region, ssh=host, ssh_user=ssh_user, ssh_key=ssh_key,
        mlflow_version=mlflow_version, port=port,
    )  # fmt: skip
    ask = (lambda question: True) if yes else confirm
    done = backups.restore(settings, backup, confirm=ask)
    console.print(
        f"restored backup {done['id']}; the previous database is in {done['pre_restore']}"
    )


@task(
    help={
        **STACK,
        "yes": "do not ask for confirmation",
        "delete_data": "also delete the bucket with every artifact and backup in it",
    }
)
@reports_errors
def destroy(c, stack=None, region=None, yes=False, delete_data=False):
    """Remove the stack's AWS resources, keeping the bucket unless told otherwise."""
    settings = config.load(c.config, stack=stack, region=region)
    kept = "and DELETE its bucket with all data" if delete_data else "keeping its bucket"
    if not yes and not confirm(f"Destroy stack '{settings.stack}' {kept}?"):
        raise Exit("nothing was changed", code=1)
    provisioning.destroy(settings, delete_data=delete_data)


@task(
    help={
        "run_id": "the MLflow run to rebuild (or give it first: reproduce RUN_ID)",
        "dest": "directory for the rebuilt tree (absent or empty)",
    }
)
@reports_errors
def reproduce(c, run_id, dest=None):
    """Rebuild the exact source tree that produced a run."""
    from ops.reproduce import reproduce as rebuild

    result = rebuild(run_id, Path(dest) if dest else None)
    console.print(result.render(), soft_wrap=True)
    if not result.ok:
        raise Exit(code=1)


@task(help={"state_dir": "where the sandbox keeps its state (default: .sandbox)"})
@reports_errors
def sandbox_up(c, state_dir=None):
    """Start the local sandbox: a moto server and a Debian guest under systemd-nspawn."""
    box = sandbox.up(Path(state_dir or sandbox.DEFAULT_STATE_DIR))
    console.print(f'sandbox ready ({box.machine}); use it: eval "$(.venv/bin/invoke sandbox.env)"')


@task(help={"state_dir": "where the sandbox keeps its state (default: .sandbox)"})
@reports_errors
def sandbox_down(c, state_dir=None):
    """Stop the local sandbox and remove its guest; the cached image stays."""
    sandbox.down(Path(state_dir or sandbox.DEFAULT_STATE_DIR))


@task(help={"state_dir": "where the sandbox keeps its state (default: .sandbox)"})
@reports_errors
def sandbox_env(c, state_dir=None):
    """Print the export lines that point every task at the sandbox."""
    box = sandbox.load(Path(state_dir or sandbox.DEFAULT_STATE_DIR))
    if box is None:
        raise OpsError("the sandbox is not up", hint="start it with `invoke sandbox.up`")
    with sandbox.environment(box):
        login = logins.login_if_any(config.load(c.config))  # and the server's certificate
    print(sandbox.env_exports(box, login), end="")


@task(
    help={
        **STACK,
        **HOST,
        "https_port": config.SETTINGS["https_port"].help,
        "user": "the login to print (default: admin); add teammates with users.add",
    }
)
@reports_errors
def client_env(c, stack=None, region=None, host=None, ssh_user=None, ssh_key=None,
               https_port=None, user=logins.ADMIN_USER):  # fmt: skip
    """Print the export lines a teammate needs to log runs to the stack."""
    settings = config.load(c.config, stack=stack, region=region, ssh=host, ssh_user=ssh_user,
                           ssh_key=ssh_key, https_port=https_port)  # fmt: skip
    print(export_lines(logins.client_env_for(settings, user)), end="")


@task(
    help={
        **STACK,
        **HOST,
        "port": config.SETTINGS["port"].help,
        "local_port": "the port on this machine to forward (default: a free one)",
    }
)
@reports_errors
def tunnel(c, stack=None, region=None, host=None, ssh_user=None, ssh_key=None, port=None,
           local_port=None):  # fmt: skip
    """Forward a local port to MLflow on the host over SSH, until Ctrl-C."""
    settings = config.load(c.config, stack=stack, region=region, ssh=host, ssh_user=ssh_user,
                           ssh_key=ssh_key, port=port)  # fmt: skip
    tunnelling.tunnel(settings, int(local_port) if local_port else None)


@task(
    help={
        **STACK,
        "name": "the teammate's user name (or give it first: users.add NAME)",
        "permission": "what they may do with every experiment and model: READ, EDIT or MANAGE",
    }
)
@reports_errors
def users_add(c, name, permission="EDIT", stack=None, region=None):
    """Add a teammate's login; its password is generated and kept in SSM."""
    settings = config.load(c.config, stack=stack, region=region)
    logins.manage_user(settings, "add", name, permission)
    console.print(f"added {name} ({permission.upper()}); they log in with: "
                  f"invoke client-env --user {name}")  # fmt: skip


@task(help={**STACK, "name": "the teammate's user name (or give it first: users.remove NAME)"})
@reports_errors
def users_remove(c, name, stack=None, region=None):
    """Remove a teammate's login and its stored password."""
    settings = config.load(c.config, stack=stack, region=region)
    logins.manage_user(settings, "remove", name)
    console.print(f"removed {name}")


sandbox_tasks = Collection("sandbox")
sandbox_tasks.add_task(sandbox_up, "up")
sandbox_tasks.add_task(sandbox_down, "down")
sandbox_tasks.add_task(sandbox_env, "env")

user_tasks = Collection("users")
user_tasks.add_task(users_add, "add")
user_tasks.add_task(users_remove, "remove")

ns = Collection(
    provision,
    deploy,
    status,
    backup,
    restore,
    destroy,
    client_env,
    tunnel,
    reproduce,
    user_tasks,
    sandbox_tasks,
)
ns.add_task(backups_, "backups")
