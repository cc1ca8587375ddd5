"""Backups of the metadata store: take one, list them, restore one.

The work happens on the host, in ``ops/host_backup.py`` (installed there as
``/opt/mlflow-ops/backup.py``): the database never passes through the
operator's machine. A backup runs under systemd with the same properties as
the scheduled ``mlflow-backup.service`` (the server's user and environment,
so it reaches S3 as the server does); a restore runs the same way as root,
because it stops and starts the server. This module starts them over SSH,
reads their JSON answer, and lists stored backups from S3 with ``Aws``.

A backup lives under ``backups/ID/`` in the stack's bucket (or in
``/var/lib/mlflow/backups`` on a host whose artifacts are not in S3): the
gzipped databases, then ``manifest.json``, written last.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fabric import Connection
from rich.table import Table

from ops import host, logins, tls
from ops.aws import Aws
from ops.config import Settings
from ops.console import console, phase
from ops.errors import OpsError
from ops.target import Connector, Target, connect, locate, uses_aws

MANIFEST = "manifest.json"
_JOURNAL_HINT = f"see `sudo journalctl -u {host.BACKUP_SERVICE}` on the host"


@dataclasses.dataclass(frozen=True)
class Stored:
    """One stored backup, as its manifest describes it."""

    id: str
    complete: bool
    verified: bool
    created: float | None = None
    mlflow_version: str | None = None
    schema_revision: str | None = None
    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    size: int = 0
    stored_size: int = 0

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Stored:
        files = entry.get("files", [])
        return cls(
            id=entry["id"],
            complete=entry["complete"],
            verified=entry["verified"],
            created=entry.get("created_epoch"),
            mlflow_version=entry.get("mlflow_version"),
            schema_revision=entry.get("schema_revision"),
            rows=entry.get("rows", {}),
            size=sum(f["size"] for f in files),
            stored_size=sum(f["compressed_size"] for f in files),
        )

    def age_hours(self, now: float) -> float | None:
        return None if self.created is None else (now - self.created) / 3600

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def destination(target: Target) -> str:
    return host.backup_destination(target.artifacts_destination)


# Running the host script.


def _systemd_run(properties: list[tuple[str, str]], argv: list[str]) -> list[str]:
    # A transient unit with the backup service's properties: it runs exactly
    # as the timer's backup does, and finishes even if SSH drops meanwhile.
    options = [f"--property={name}={value}" for name, value in properties]
    return ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", *options, "--", *argv]


def _on_host(c: Connection, argv: list[str], what: str) -> dict[str, Any]:
    """Run the host script as root; its JSON answer, or an OpsError with its message."""
    done = c.run(shlex.join(["sudo", "-n", "--", *argv]), hide=True, warn=True, in_stream=False)
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        detail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise OpsError(f"{what} failed on the host: {detail or 'no answer'}", hint=_JOURNAL_HINT)
    if not answer.get("ok"):
        raise OpsError(f"{what} failed: {answer.get('error')}", hint=_JOURNAL_HINT)
    return answer


def take(settings: Settings, *, keep: int | None = None, connector: Connector = connect) -> dict:
    """Take a backup on the host now, as the timer would; the host script's answer."""
    keep = settings.backup_keep if keep is None else keep
    if keep < 1:
        raise OpsError("--keep must be at least 1: the backup just taken is always kept")
    target = locate(settings)
    argv = host.backup_command(destination(target), "backup", "--keep", str(keep))
    with phase(f"Backing up the metadata store on {target.ssh}"), connector(settings, target) as c:
        return _on_host(c, _systemd_run(host.backup_properties(), argv), "the backup")


# Listing.


def stored(
    settings: Settings,
    *,
    target: Target | None = None,
    aws: Aws | None = None,
    connector: Connector = connect,
) -> list[Stored]:
    """Every stored backup, oldest first: from S3, or from the host when kept there."""
    target = target or locate(settings, aws)
    where = destination(target)
    if not where.startswith("s3://"):
        argv = host.backup_command(where, "list")
        with connector(settings, target) as c:
            answer = _on_host(c, argv, "listing the backups")
        return [Stored.of(entry) for entry in answer["backups"]]

    aws = aws or Aws.connect(settings)
    bucket, _, prefix = where[len("s3://") :].partition("/")
    sizes: dict[str, dict[str, int]] = {}
    for item in aws.list_objects(bucket, prefix + "/"):
        backup_id, _, name = item["Key"][len(prefix) + 1 :].partition("/")
        if name:
            sizes.setdefault(backup_id, {})[name] = item["Size"]

    found = []
    for backup_id, files in sorted(sizes.items()):
        if MANIFEST not in files:
            found.append(Stored(backup_id, complete=False, verified=False))
            continue
        try:
            manifest = json.loads(aws.get_object(bucket, f"{prefix}/{backup_id}/{MANIFEST}"))
        except ValueError:
            found.append(Stored(backup_id, complete=True, verified=False))
            continue
        # Verified: checked on the host before upload, and every file arrived whole.
        whole = all(files.get(f["object"]) == f["compressed_size"] for f in manifest["files"])
        verified = manifest.get("integrity") == "ok" and whole
        found.append(Stored.of({**manifest, "complete": True, "verified": verified}))
    return found


def newest_good(backups: list[Stored]) -> Stored | None:
    good = [backup for backup in backups if backup.verified]
    return good[-1] if good else None


def _when(backup: Stored) -> str:
    if backup.created is None:
        return "-"
    return datetime.fromtimestamp(backup.created, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def show(backups: list[Stored]) -> None:
    """A table of the backups, newest first; the id is the time it was taken (UTC)."""
    table = Table(title="backups", title_justify="left")
    counted = ("experiments", "runs", "metrics", "params", "tags")
    for column in ("id (UTC)", "size", "MLflow", *counted, "verified"):
        table.add_column(column, no_wrap=column == "id (UTC)")
    for backup in reversed(backups):
        rows = [str(backup.rows.get(name, "-")) for name in counted]
        verified = "[green]yes[/]" if backup.verified else "[red]no[/]"
        if not backup.complete:
            verified = "[red]incomplete[/]"
        size = f"{_size(backup.stored_size)} ({_size(backup.size)} raw)"
        table.add_row(backup.id, size, backup.mlflow_version or "-", *rows, verified)
    console.print(table)


# Restore.


def restore(
    settings: Settings,
    backup_id: str = "latest",
    *,
    confirm: Callable[[str], bool],
    connector: Connector = connect,
) -> dict:
    """Restore a backup over the live metadata store, or leave it untouched and say why."""
    target = locate(settings)
    where = destination(target)
    if where.startswith("s3://"):
        backups = [backup for backup in stored(settings, target=target) if backup.complete]
        if backup_id == "latest":
            chosen = backups[-1:]
        else:
            chosen = [backup for backup in backups if backup.id == backup_id]
        if not chosen:
            which = "any backup" if backup_id == "latest" else f"backup {backup_id}"
            raise OpsError(
                f"there is no {which} at {where}", hint="`invoke backups` lists the stored ones"
            )
        backup = chosen[0]
        backup_id = backup.id
        runs = backup.rows.get("runs", "?")
        question = (
            f"Replace the metadata store on {target.ssh} with backup {backup_id} "
            f"({_when(backup)}, {runs} runs)? The server stops meanwhile"
        )
    else:
        question = f"Replace the metadata store on {target.ssh} with backup {backup_id}?"
    if not confirm(question):
        raise OpsError("nothing was changed", hint="pass --yes to restore without the question")

    argv = host.backup_command(where, "restore", "--id", backup_id, "--service", host.SERVICE)
    argv += ["--health-url", f"http://127.0.0.1:{settings.port}/health"]
    properties = [("EnvironmentFile", host.ENV_PATH), ("WorkingDirectory", host.DATA_DIR)]
    with phase(f"Restoring backup {backup_id} on {target.ssh}"), connector(settings, target) as c:
        answer = _on_host(c, _systemd_run(properties, argv), f"restoring backup {backup_id}")

    # Judge the result as a teammate would: through the server.
    from ops import health  # health imports this module to check the backups' age

    with phase(f"Waiting for {target.url} to answer"):
        login = logins.admin_login(settings)
        verify = tls.verify_for(settings, Aws.connect(settings) if uses_aws(settings) else None)
        health.wait_until_ready(target.url, settings.mlflow_version, login=login, verify=verify)
    return answer


def describe(answer: dict) -> str:
    """One line on a backup that was just taken."""
    manifest = answer["manifest"]
    rows = manifest["rows"]
    size = sum(f["compressed_size"] for f in manifest["files"])
    pruned = f"; pruned {len(answer['pruned'])} older" if answer.get("pruned") else ""
    return (
        f"stored backup {answer['id']} at {answer['destination']}/{answer['id']}: "
        f"{rows.get('runs', 0)} runs, {rows.get('metrics', 0)} metrics, "
        f"{_size(size)}, MLflow {manifest['mlflow_version']}, verified{pruned}"
    )
