"""Backups end to end: taken under load, listed, scheduled, and proven by restoring them.

The real tasks run against the sandbox, as in ``test_e2e``: a booted Debian
guest with the real MLflow server, and a moto S3. The tests build on each
other in file order and leave the stack deployed and healthy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shlex
import threading
import time

import pytest
import requests

from tests.test_e2e import (
    exported,
    guest,
    invoke,
    login,
    moto_s3,
    seconds_until_healthy,
    status,
    trusted,
)

DB = "/var/lib/mlflow/mlflow.db"
# Read the guest's database with its own Python: one value per line.
QUERY = "import sqlite3; [print(*row) for row in sqlite3.connect('{}').execute(\"{}\")]"
INTEGRITY = "PRAGMA integrity_check"


@pytest.fixture(scope="module")
def stack(sandbox_env: dict[str, str]) -> dict[str, str]:
    """A provisioned and deployed stack in the sandbox; its environment, with the admin login."""
    invoke(sandbox_env, "provision")
    invoke(sandbox_env, "deploy")
    return {**sandbox_env, **exported(invoke(sandbox_env, "client-env").stdout)}


def stored(env: dict[str, str]) -> list[dict]:
    return json.loads(invoke(env, "backups", "--json").stdout)


def backup(env: dict[str, str], *args: str) -> str:
    """Take a backup with the task; its id."""
    done = invoke(env, "backup", *args)
    assert "verified" in done.stdout
    return done.stdout.split("stored backup ", 1)[1].split()[0]


def bucket_of(env: dict[str, str]) -> str:
    buckets = moto_s3(env).list_buckets()["Buckets"]
    return next(b["Name"] for b in buckets if b["Name"].startswith("mlflow-ops-"))


class Client:
    """A teammate logging runs over the REST API, as MLflow's client does."""

    def __init__(self, env: dict[str, str]):
        self.url = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow"
        self.session = requests.Session()
        self.session.auth = login(env)
        self.session.verify = trusted(env)

    def call(self, endpoint: str, body: dict) -> dict:
        answer = self.session.post(
            f"{self.url}/{endpoint}", json=body, timeout=30, verify=self.session.verify
        )
        answer.raise_for_status()
        return answer.json()

    def log_run(self, tag: str) -> str:
        now = int(time.time() * 1000)
        run_id = self.call("runs/create", {"experiment_id": "0", "start_time": now})["run"]["info"][
            "run_id"
        ]
        metrics = [{"key": f"m{i}", "value": i / 7, "timestamp": now, "step": 0} for i in range(5)]
        params = [{"key": "tag", "value": tag}, {"key": "seed", "value": "7"}]
        self.call("runs/log-batch", {"run_id": run_id, "metrics": metrics, "params": params})
        return run_id

    def runs(self) -> dict[str, dict]:
        """Every run: its metric keys and its params."""
        found, token = {}, None
        while True:
            body = {"experiment_ids": ["0"], "max_results": 1000}
            if token:
                body["page_token"] = token
            page = self.call("runs/search", body)
            for run in page.get("runs", []):
                data = run["data"]
                found[run["info"]["run_id"]] = {
                    "metrics": sorted(m["key"] for m in data.get("metrics", [])),
                    "params": {p["key"]: p["value"] for p in data.get("params", [])},
                }
            token = page.get("next_page_token")
            if not token:
                return found


def db_state(env: dict[str, str]) -> str:
    """The live database's files and the server's process, to prove nothing touched them."""
    files = guest(env, f"sudo sha256sum {DB} {DB}-wal 2>/dev/null; true")
    return files + guest(env, "systemctl show mlflow --property=MainPID")


def test_deploy_installs_the_timer_and_takes_a_first_verified_backup(stack):
    assert guest(stack, "systemctl is-enabled mlflow-backup.timer").strip() == "enabled"
    assert "mlflow-backup.timer" in guest(stack, "systemctl list-timers --all")
    backups = stored(stack)
    assert backups and all(b["verified"] for b in backups)
    code, checks = status(stack)
    assert checks["backup"]["outcome"] == "ok", checks["backup"]
    assert code == 0, checks


def test_a_backup_under_load_restores_every_run_committed_before_it_and_none_after(stack):
    committed: list[tuple[float, str]] = []  # (when the server confirmed it, run id)
    stop = threading.Event()
    errors: list[Exception] = []

    def keep_logging(number: int) -> None:
        client = Client(stack)
        while not stop.is_set():
            try:
                run_id = client.log_run(f"client-{number}")
            except requests.RequestException as exc:  # the load must not fail silently
                errors.append(exc)
                return
            committed.append((time.monotonic(), run_id))

    clients = [threading.Thread(target=keep_logging, args=(n,)) for n in range(4)]
    for thread in clients:
        thread.start()
    try:
        # Enough committed runs to prove something, however slow the machine.
        deadline = time.monotonic() + 120
        while len(committed) < 12 and not errors and time.monotonic() < deadline:
            time.sleep(0.2)
        began = time.monotonic()
        backup_id = backup(stack)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert errors == []
    before = {run_id for at, run_id in committed if at < began}
    assert len(before) >= 12, "the clients logged too little to prove anything"

    after = {Client(stack).log_run("after the backup") for _ in range(3)}
    invoke(stack, "restore", "--backup", backup_id, "--yes")

    runs = Client(stack).runs()
    assert before <= set(runs)
    assert not after & set(runs)
    for run_id in before:
        assert runs[run_id]["metrics"] == [f"m{i}" for i in range(5)]
        assert runs[run_id]["params"]["seed"] == "7"
    assert guest(stack, f"sudo python3 -c {shlex.quote(QUERY.format(DB, INTEGRITY))}") == "ok\n"


def _copy_backup(env: dict[str, str], source: str, target: str, damage) -> None:
    """Store a copy of backup ``source`` as ``target``, damaged by ``damage(objects)``."""
    s3, bucket = moto_s3(env), bucket_of(env)
    objects = {
        item["Key"].rsplit("/", 1)[1]: s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in s3.list_objects_v2(Bucket=bucket, Prefix=f"backups/{source}/")["Contents"]
    }
    manifest = json.loads(objects["manifest.json"])
    manifest["id"] = target
    damage(objects, manifest)
    objects["manifest.json"] = json.dumps(manifest).encode()
    for name, body in objects.items():
        s3.put_object(Bucket=bucket, Key=f"backups/{target}/{name}", Body=body)


def _truncated_database(objects, manifest):
    # Checksums that match a database cut in half: only the integrity check can tell.
    raw = gzip.decompress(objects["mlflow.db.gz"])
    raw = raw[: len(raw) // 2]
    objects["mlflow.db.gz"] = gzip.compress(raw)
    entry = manifest["files"][0]
    entry["size"], entry["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
    entry["compressed_size"] = len(objects["mlflow.db.gz"])
    entry["compressed_sha256"] = hashlib.sha256(objects["mlflow.db.gz"]).hexdigest()


def _flipped_byte(objects, manifest):
    data = bytearray(objects["mlflow.db.gz"])
    data[len(data) // 2] ^= 0x01
    objects["mlflow.db.gz"] = bytes(data)


def _checksum_mismatch(objects, manifest):
    manifest["files"][0]["sha256"] = "0" * 64


def _newer_mlflow(objects, manifest):
    manifest["mlflow_version"] = "99.1.0"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncated_database, "not a readable database"),
        (_flipped_byte, "fails its SHA-256 check"),
        (_checksum_mismatch, "fails its SHA-256 check"),
        (_newer_mlflow, "deploy MLflow 99.1.0 first"),
        (None, "there is no backup 20000101T000000Z-0000"),
    ],
    ids=["truncated-file", "flipped-byte", "checksum-mismatch", "newer-mlflow", "missing-id"],
)
def test_restore_refuses_a_bad_backup_and_leaves_the_live_database_untouched(
    stack, damage, message
):
    target = "20000101T000000Z-0000"
    if damage is not None:
        _copy_backup(stack, stored(stack)[-1]["id"], target, damage)
    before = db_state(stack)
    try:
        done = invoke(stack, "restore", "--backup", target, "--yes", check=False)
        assert done.returncode != 0
        assert message in done.stderr, done.stderr
        assert db_state(stack) == before
    finally:
        s3, bucket = moto_s3(stack), bucket_of(stack)
        for item in s3.list_objects_v2(Bucket=bucket, Prefix=f"backups/{target}/").get(
            "Contents", []
        ):
            s3.delete_object(Bucket=bucket, Key=item["Key"])


def test_restore_ignores_stale_wal_and_shm_files_beside_the_database(stack):
    backup_id = backup(stack)
    runs = set(Client(stack).runs())

    # A WAL left by a writer that died, holding a commit the backup never saw.
    ghost = (
        f"import os, sqlite3; c = sqlite3.connect('{DB}'); "
        "c.execute('PRAGMA wal_autocheckpoint=0'); c.execute('CREATE TABLE ghost (x)'); "
        "c.commit(); os._exit(0)"
    )
    guest(stack, "sudo systemctl stop mlflow")
    guest(stack, f"sudo -u mlflow python3 -c {shlex.quote(ghost)}")
    assert guest(stack, f"sudo ls {DB}-wal {DB}-shm").split() == [f"{DB}-shm", f"{DB}-wal"]

    invoke(stack, "restore", "--backup", backup_id, "--yes")
    assert set(Client(stack).runs()) == runs
    tables = "SELECT name FROM sqlite_master WHERE type = 'table'"
    found = guest(stack, f"sudo python3 -c {shlex.quote(QUERY.format(DB, tables))}")
    assert "ghost" not in found
    assert guest(stack, f"sudo python3 -c {shlex.quote(QUERY.format(DB, INTEGRITY))}") == "ok\n"


def test_the_timer_takes_a_listed_verified_backup_and_pruning_keeps_n(stack):
    known = {b["id"] for b in stored(stack)}
    # What the timer does when it fires: start the backup service.
    guest(stack, "sudo systemctl start mlflow-backup.service")
    fresh = [b for b in stored(stack) if b["id"] not in known]
    assert len(fresh) == 1 and fresh[0]["verified"]
    assert fresh[0]["rows"]["runs"] > 0

    backup(stack, "--keep", "2")
    assert len([b for b in stored(stack) if b["complete"]]) == 2


def test_the_stack_is_healthy_after_the_restores(stack):
    seconds_until_healthy(stack, 60)
    code, checks = status(stack)
    assert code == 0, checks
    assert "h old" in checks["backup"]["detail"]
