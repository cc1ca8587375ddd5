"""The host's backup script against real SQLite files, with a directory as the store."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from ops import host_backup

SCHEMA = """
CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL);
INSERT INTO alembic_version VALUES ('1b5f0d9ad7c1');
CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT UNIQUE);
CREATE TABLE runs (run_uuid TEXT PRIMARY KEY, experiment_id INTEGER);
CREATE TABLE metrics (run_uuid TEXT, key TEXT, value REAL, step INTEGER);
CREATE TABLE params (run_uuid TEXT, key TEXT, value TEXT);
CREATE TABLE tags (run_uuid TEXT, key TEXT, value TEXT);
INSERT INTO experiments (name) VALUES ('Default');
"""


def make_store(data_dir: Path, runs: int = 3) -> Path:
    """A metadata store in WAL mode, as the server keeps it, with ``runs`` runs."""
    data_dir.mkdir(exist_ok=True)
    path = data_dir / "mlflow.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    for number in range(runs):
        log_run(db, f"run-{number}")
    db.close()
    return path


def log_run(db: sqlite3.Connection, run_id: str) -> None:
    with db:
        db.execute("INSERT INTO runs VALUES (?, 1)", (run_id,))
        db.executemany(
            "INSERT INTO metrics VALUES (?, 'loss', ?, ?)", [(run_id, i / 3, i) for i in range(4)]
        )
        db.execute("INSERT INTO params VALUES (?, 'lr', '0.1')", (run_id,))


def run_ids(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {row[0] for row in db.execute("SELECT run_uuid FROM runs")}
    finally:
        db.close()


def take(data_dir: Path, store: Path, keep: int = 14) -> dict:
    return host_backup.backup(str(data_dir), host_backup.DirStore(str(store)), keep)


def restore(data_dir: Path, store: Path, wanted: str = "latest", **options) -> dict:
    return host_backup.restore(
        str(data_dir), host_backup.DirStore(str(store)), wanted, installed="3.17.2", **options
    )


def test_a_backup_stores_a_compressed_snapshot_and_a_manifest_that_describes_it(tmp_path):
    make_store(tmp_path / "data", runs=3)
    done = take(tmp_path / "data", tmp_path / "store")

    folder = tmp_path / "store" / done["id"]
    assert sorted(os.listdir(folder)) == ["manifest.json", "mlflow.db.gz"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == {"experiments": 1, "runs": 3, "metrics": 12, "params": 3, "tags": 0}
    assert manifest["schema_revision"] == "1b5f0d9ad7c1"
    assert manifest["integrity"] == "ok"
    assert manifest["mlflow_version"] == host_backup.mlflow_version()
    packed = (folder / "mlflow.db.gz").read_bytes()
    (entry,) = manifest["files"]
    assert entry["compressed_sha256"] == hashlib.sha256(packed).hexdigest()
    assert entry["sha256"] == hashlib.sha256(gzip.decompress(packed)).hexdigest()
    assert not [name for name in os.listdir(tmp_path / "data") if name.startswith(".backup-")]


def test_the_auth_database_is_backed_up_when_logins_are_on(tmp_path):
    make_store(tmp_path / "data")
    auth = sqlite3.connect(tmp_path / "data" / "basic_auth.db")
    auth.executescript("CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT);"
                       "INSERT INTO users (username) VALUES ('admin');")  # fmt: skip
    auth.close()
    done = take(tmp_path / "data", tmp_path / "store")
    files = {entry["name"]: entry for entry in done["manifest"]["files"]}
    assert set(files) == {"mlflow.db", "basic_auth.db"}
    assert files["basic_auth.db"]["rows"] == {"users": 1}


def test_a_backup_taken_while_a_writer_commits_holds_every_earlier_commit_intact(tmp_path):
    make_store(tmp_path / "data", runs=0)
    committed: list[tuple[float, str]] = []
    stop = threading.Event()

    def keep_writing() -> None:
        db = sqlite3.connect(tmp_path / "data" / "mlflow.db", timeout=30)
        number = 0
        while not stop.is_set():
            log_run(db, f"run-{number}")
            committed.append((time.monotonic(), f"run-{number}"))
            number += 1
        db.close()

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(0.3)
        began = time.monotonic()
        done = take(tmp_path / "data", tmp_path / "store")
    finally:
        stop.set()
        writer.join()

    restore(tmp_path / "data", tmp_path / "store", done["id"])
    before = {run_id for at, run_id in committed if at < began}
    assert before and before <= run_ids(tmp_path / "data" / "mlflow.db")
    assert len(committed) > len(before)  # the writer kept going during the backup


def test_pruning_keeps_the_newest_n_and_drops_older_incomplete_backups(tmp_path):
    make_store(tmp_path / "data")
    store = tmp_path / "store"
    (store / "20000101T000000Z-0000").mkdir(parents=True)  # an upload cut short long ago
    (store / "20000101T000000Z-0000" / "mlflow.db.gz").write_bytes(b"partial")
    taken = [take(tmp_path / "data", store, keep=2)["id"] for _ in range(4)]
    assert sorted(os.listdir(store)) == taken[-2:]


def test_a_keep_below_one_is_refused(tmp_path):
    make_store(tmp_path / "data")
    with pytest.raises(host_backup.Failed, match="at least 1"):
        take(tmp_path / "data", tmp_path / "store", keep=0)


def test_restore_brings_back_the_backup_and_keeps_the_live_database_aside(tmp_path):
    live = make_store(tmp_path / "data", runs=2)
    done = take(tmp_path / "data", tmp_path / "store")
    db = sqlite3.connect(live)
    log_run(db, "after the backup")
    db.close()

    restored = restore(tmp_path / "data", tmp_path / "store")
    assert restored["id"] == done["id"]
    assert run_ids(live) == {"run-0", "run-1"}
    assert "after the backup" in run_ids(Path(restored["pre_restore"]) / "mlflow.db")


def test_the_three_newest_pre_restore_copies_are_kept_and_a_failure_prunes_none(tmp_path):
    make_store(tmp_path / "data", runs=1)
    take(tmp_path / "data", tmp_path / "store")
    folders = [restore(tmp_path / "data", tmp_path / "store")["pre_restore"] for _ in range(4)]
    kept = sorted(str(p) for p in (tmp_path / "data").glob("pre-restore-*"))
    assert kept == folders[1:]

    with pytest.raises(host_backup.Failed):
        restore(tmp_path / "data", tmp_path / "store", health_url="http://127.0.0.1:9/",
                health_timeout=0.2)  # fmt: skip
    assert len(list((tmp_path / "data").glob("pre-restore-*"))) == 4


def damage_file(store: Path, backup_id: str) -> None:
    packed = store / backup_id / "mlflow.db.gz"
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))


def cut_file(store: Path, backup_id: str) -> None:
    packed = store / backup_id / "mlflow.db.gz"
    packed.write_bytes(packed.read_bytes()[:100])


def bad_checksum(store: Path, backup_id: str) -> None:
    path = store / backup_id / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))


def newer_mlflow(store: Path, backup_id: str) -> None:
    path = store / backup_id / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["mlflow_version"] = "3.18.0"
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (damage_file, "fails its SHA-256 check"),
        (cut_file, "fails its SHA-256 check"),
        (bad_checksum, "fails its SHA-256 check"),
        (newer_mlflow, "deploy MLflow 3.18.0 first"),
    ],
)
def test_restore_refuses_a_bad_backup_and_touches_nothing(tmp_path, damage, message):
    live = make_store(tmp_path / "data")
    done = take(tmp_path / "data", tmp_path / "store")
    damage(tmp_path / "store", done["id"])
    before = {name: (tmp_path / "data" / name).read_bytes() for name in ("mlflow.db",)}
    with pytest.raises(host_backup.Failed, match=message):
        restore(tmp_path / "data", tmp_path / "store", done["id"])
    assert live.read_bytes() == before["mlflow.db"]
    assert not [name for name in os.listdir(tmp_path / "data") if "restore" in name]


def test_restore_of_a_missing_backup_names_it(tmp_path):
    make_store(tmp_path / "data")
    take(tmp_path / "data", tmp_path / "store")
    with pytest.raises(host_backup.Failed, match="no backup 20000101T000000Z-0000"):
        restore(tmp_path / "data", tmp_path / "store", "20000101T000000Z-0000")


def test_restore_removes_stale_wal_and_shm_files(tmp_path):
    live = make_store(tmp_path / "data", runs=1)
    take(tmp_path / "data", tmp_path / "store")
    # A writer that died and left a WAL holding a commit the backup never saw.
    stale = sqlite3.connect(live)
    stale.execute("PRAGMA wal_autocheckpoint=0")
    log_run(stale, "ghost")
    (tmp_path / "wal").write_bytes(Path(f"{live}-wal").read_bytes())
    stale.close()
    Path(f"{live}-wal").write_bytes((tmp_path / "wal").read_bytes())

    restore(tmp_path / "data", tmp_path / "store")
    assert run_ids(live) == {"run-0"}


def test_a_restore_that_fails_after_the_swap_puts_the_live_database_back(tmp_path):
    live = make_store(tmp_path / "data", runs=1)
    take(tmp_path / "data", tmp_path / "store")
    db = sqlite3.connect(live)
    log_run(db, "newest")
    db.close()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(host_backup.Failed, match="pre-restore database was put back"):
        restore(tmp_path / "data", tmp_path / "store", health_url=f"http://127.0.0.1:{port}/",
                health_timeout=0.5)  # fmt: skip
    assert run_ids(live) == {"run-0", "newest"}


def test_the_command_line_prints_one_json_result_and_exits_1_on_failure(tmp_path, capsys):
    make_store(tmp_path / "data")
    store = str(tmp_path / "store")
    args = ["--data-dir", str(tmp_path / "data"), "--destination", store]
    assert host_backup.main(["backup", *args]) == 0
    assert host_backup.main(["list", *args]) == 0
    assert host_backup.main(["restore", *args, "--id", "20000101T000000Z-0000"]) == 1
    taken, listed, failed = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert [b["id"] for b in listed["backups"]] == [taken["id"]]
    assert listed["backups"][0]["verified"] is True
    assert failed == {"ok": False, "error": f"there is no backup 20000101T000000Z-0000 at {store}"}
