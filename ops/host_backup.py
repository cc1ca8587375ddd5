"""Back up and restore the MLflow metadata store, on the host itself.

This file runs on the host, not here: deploy installs it as
``/opt/mlflow-ops/backup.py`` and systemd runs it with the MLflow release's
Python, which has boto3 and sqlite3, in the server's environment (so it
reaches S3 exactly as the server does: the instance role on EC2). It uses the
standard library and boto3 alone. The database never leaves the host except
as a verified, compressed backup.

    backup.py backup  --data-dir DIR --destination DEST [--keep N]
    backup.py restore --data-dir DIR --destination DEST --id ID|latest [--service NAME]
    backup.py list    --destination DEST

DEST is ``s3://bucket/prefix`` or a directory. A backup is a folder ``ID/``
under it: each database gzip-compressed, then ``manifest.json``, written last,
so a backup without a manifest is incomplete and never restored. ``ID`` is the
UTC time it was taken, to the millisecond, so IDs sort by age.

A snapshot is taken with SQLite's online backup API in one step: it reads
one consistent state of a live database (in WAL mode the server keeps
writing meanwhile), never a file copy that may catch a write half-done.

Each command prints progress on standard error and its result as one JSON
object on the last line of standard output; it exits 1 on failure.
"""

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import zlib

FORMAT = 1
# The metadata store is required; the auth database exists once logins are on.
DATABASES = ("mlflow.db", "basic_auth.db")
REQUIRED = "mlflow.db"
COUNTED_TABLES = (
    "experiments",
    "runs",
    "metrics",
    "params",
    "tags",
    "users",
    "experiment_permissions",
    "registered_model_permissions",
)
MANIFEST = "manifest.json"
CHUNK = 1 << 20
# gzip level 1 compresses a metadata store about as well as level 6 at a
# fraction of the time (see bench/bench_backup.py).
LEVEL = 1
PRE_RESTORE_KEPT = 3
_ID = re.compile(r"^\d{8}T\d{6}(\.\d{3})?Z-[0-9a-f]{4}$")


class Failed(Exception):
    """A failure to report to the operator in one sentence."""


def say(text):
    print(text, file=sys.stderr, flush=True)


# Where backups are stored: an S3 prefix or a directory.


class S3Store:
    def __init__(self, bucket, prefix):
        import boto3  # only the S3 destination needs it

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.s3 = boto3.client("s3")
        self.where = f"s3://{bucket}/{self.prefix}"

    def _key(self, name):
        return f"{self.prefix}/{name}"

    def names(self):
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/"
        )
        found = {}
        for page in pages:
            for item in page.get("Contents", []):
                found[item["Key"][len(self.prefix) + 1 :]] = item["Size"]
        return found

    def put(self, path, name):
        self.s3.upload_file(path, self.bucket, self._key(name))

    def get(self, name, path):
        self.s3.download_file(self.bucket, self._key(name), path)

    def read(self, name):
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def write(self, name, data):
        self.s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def delete(self, names):
        names = list(names)
        for start in range(0, len(names), 1000):
            chunk = [{"Key": self._key(name)} for name in names[start : start + 1000]]
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk})


class DirStore:
    def __init__(self, root):
        self.root = root
        self.where = root

    def _path(self, name):
        return os.path.join(self.root, name)

    def names(self):
        found = {}
        for folder, _, files in os.walk(self.root):
            for file in files:
                path = os.path.join(folder, file)
                found[os.path.relpath(path, self.root)] = os.path.getsize(path)
        return found

    def put(self, path, name):
        os.makedirs(os.path.dirname(self._path(name)), exist_ok=True)
        shutil.copyfile(path, self._path(name) + ".part")
        os.replace(self._path(name) + ".part", self._path(name))

    def get(self, name, path):
        shutil.copyfile(self._path(name), path)

    def read(self, name):
        try:
            with open(self._path(name), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def write(self, name, data):
        os.makedirs(os.path.dirname(self._path(name)), exist_ok=True)
        with open(self._path(name) + ".part", "wb") as handle:
            handle.write(data)
        os.replace(self._path(name) + ".part", self._path(name))

    def delete(self, names):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(name))
        for entry in os.listdir(self.root) if os.path.isdir(self.root) else []:
            with contextlib.suppress(OSError):
                os.rmdir(self._path(entry))


def store_for(destination):
    if destination.startswith("s3://"):
        bucket, _, prefix = destination[len("s3://") :].partition("/")
        return S3Store(bucket, prefix)
    return DirStore(destination)


def catalogue(store):
    """Every backup ID with its object names and sizes; ``complete`` when it has a manifest."""
    backups = {}
    for name, size in store.names().items():
        backup_id, _, file = name.partition("/")
        if _ID.match(backup_id) and file:
            backups.setdefault(backup_id, {})[file] = size
    return dict(sorted(backups.items()))


def read_manifest(store, backup_id):
    data = store.read(f"{backup_id}/{MANIFEST}")
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        raise Failed(f"the manifest of backup {backup_id} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Failed(f"the manifest of backup {backup_id} has an unknown format")
    return manifest


# SQLite.


def connect(path, readonly=False):
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    connection = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
    return connection


def snapshot(source_path, target_path):
    """Copy one consistent state of a live database into a new self-contained file."""
    source = connect(source_path)
    target = sqlite3.connect(target_path, isolation_level=None)
    try:
        # pages=-1 copies every page in one step, under one read transaction,
        # so writers committing meanwhile are neither blocked nor half-seen.
        source.backup(target, pages=-1)
        target.execute("PRAGMA journal_mode=DELETE")
    finally:
        target.close()
        source.close()


def inspect(path, integrity="integrity_check"):
    """Integrity, schema revision and row counts of a database file.

    ``integrity`` is the check to run: SQLite's full ``integrity_check``,
    the faster ``quick_check`` (every page, but not indexes against their
    tables), or None.
    """
    connection = connect(path, readonly=True)
    try:
        if integrity:
            problems = [row[0] for row in connection.execute(f"PRAGMA {integrity}")]
            if problems != ["ok"]:
                raise Failed(f"integrity check failed: {'; '.join(problems[:3])}")
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        revision = None
        for table in ("alembic_version", "alembic_version_auth"):
            if table in tables:
                found = connection.execute(f"SELECT version_num FROM {table}").fetchone()
                revision = found[0] if found else None
                break
        rows = {
            table: connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
            for table in COUNTED_TABLES
            if table in tables
        }
    except sqlite3.DatabaseError as exc:
        raise Failed(f"{os.path.basename(path)} is not a readable database: {exc}") from None
    finally:
        connection.close()
    return revision, rows


def compress(source, target, level=LEVEL):
    """gzip ``source`` into ``target``; the SHA-256 of both and the compressed size."""
    raw, packed = hashlib.sha256(), hashlib.sha256()
    deflate = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: a gzip container
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(CHUNK):
            raw.update(chunk)
            out = deflate.compress(chunk)
            packed.update(out)
            writer.write(out)
        out = deflate.flush()
        packed.update(out)
        writer.write(out)
    return raw.hexdigest(), packed.hexdigest(), os.path.getsize(target)


def unpack(source, target):
    """gunzip ``source`` into ``target`` in one pass.

    Returns the SHA-256 of ``source`` and of what it decompressed to, or
    None for the latter when it does not decompress whole: hashing goes on
    to the end, so a damaged file is still named by its checksum. Each chunk
    is hashed and written while the next one decompresses, on two cores.
    """
    packed, raw = hashlib.sha256(), hashlib.sha256()
    inflate = zlib.decompressobj(31)  # 31: a gzip container
    broken = False

    def keep(out):
        raw.update(out)
        writer.write(out)

    with (
        open(source, "rb") as reader,
        open(target, "wb") as writer,
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool,
    ):
        kept = pool.submit(keep, b"")  # so that there is always a last chunk to wait for
        while chunk := reader.read(CHUNK):
            packed.update(chunk)
            if broken:
                continue
            try:
                out = inflate.decompress(chunk)
            except zlib.error:
                broken = True
                continue
            kept.result()  # in order, and one chunk in hand at most
            kept = pool.submit(keep, out)
        kept.result()
        if not broken:
            keep(inflate.flush())
    whole = not broken and inflate.eof
    return packed.hexdigest(), raw.hexdigest() if whole else None


def flush(path):
    """Wait until ``path`` is on the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def mlflow_version():
    try:
        return importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        return None


def version_key(version):
    """``3.17.2`` -> (3, 17, 2); a pre-release counts as its release."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("rc")[0])[:3])


@contextlib.contextmanager
def locked(data_dir):
    """One backup or restore at a time on this host; the timer's waits for a manual one."""
    # Opened for reading: root's restore and the mlflow user's backup share it.
    descriptor = os.open(os.path.join(data_dir, ".backup.lock"), os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def staging(data_dir, name):
    # On the database's own volume: a snapshot may not fit in a tmpfs /tmp,
    # and a restored file must be renamed into place atomically.
    path = os.path.join(data_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# backup


def utc_stamp(seconds):
    """A UTC time to the millisecond, in a form that sorts by age: 20261203T154053.826Z."""
    millis = int(seconds * 1000) % 1000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def backup(data_dir, store, keep, level=LEVEL, now=time.time):
    if keep < 1:
        raise Failed("--keep must be at least 1: the backup just taken is always kept")
    if not os.path.exists(os.path.join(data_dir, REQUIRED)):
        raise Failed(f"no database at {os.path.join(data_dir, REQUIRED)}")
    started = now()
    backup_id = f"{utc_stamp(started)}-{secrets.token_hex(2)}"
    with locked(data_dir), staging(data_dir, f".backup-{backup_id}") as work:
        files, rows, revision = [], {}, None
        for name in DATABASES:
            live = os.path.join(data_dir, name)
            if not os.path.exists(live):
                continue
            copy = os.path.join(work, name)
            snapshot(live, copy)
            # Check and compress the snapshot at once, on two cores: both only
            # read it, and SQLite and zlib let go of the interpreter's lock.
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                checked = pool.submit(inspect, copy)
                raw_sha, packed_sha, packed_size = compress(copy, copy + ".gz", level)
                file_revision, file_rows = checked.result()
            if name == REQUIRED:
                revision, rows = file_revision, file_rows
            files.append(
                {
                    "name": name,
                    "object": f"{name}.gz",
                    "size": os.path.getsize(copy),
                    "sha256": raw_sha,
                    "compressed_size": packed_size,
                    "compressed_sha256": packed_sha,
                    "schema_revision": file_revision,
                    "rows": file_rows,
                }
            )
            os.remove(copy)
            store.put(copy + ".gz", f"{backup_id}/{name}.gz")
            say(f"{name}: {files[-1]['size']} bytes, {packed_size} compressed, integrity ok")

        manifest = {
            "format": FORMAT,
            "id": backup_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "created_epoch": started,
            "host": socket.gethostname(),
            "mlflow_version": mlflow_version(),
            "schema_revision": revision,
            "rows": rows,
            "integrity": "ok",
            "files": files,
            "seconds": round(now() - started, 3),
        }
        # Uploaded last: only a backup whose every file arrived has a manifest.
        stored = catalogue(store).get(backup_id, {})
        for entry in files:
            if stored.get(entry["object"]) != entry["compressed_size"]:
                raise Failed(f"{entry['object']} did not arrive whole at {store.where}")
        store.write(f"{backup_id}/{MANIFEST}", json.dumps(manifest, indent=2).encode())

    pruned = prune(store, keep, backup_id)
    return {"ok": True, "id": backup_id, "destination": store.where, "manifest": manifest,
            "pruned": pruned}  # fmt: skip


def prune(store, keep, newest):
    """Delete all but the ``keep`` newest complete backups, and older incomplete ones."""
    backups = catalogue(store)
    complete = [backup_id for backup_id, files in backups.items() if MANIFEST in files]
    kept = set(complete[-keep:]) | {newest}
    doomed = [backup_id for backup_id in backups if backup_id not in kept and backup_id < newest]
    store.delete(f"{backup_id}/{file}" for backup_id in doomed for file in backups[backup_id])
    if doomed:
        say(f"pruned {len(doomed)} older backup(s), kept {len(kept)}")
    return doomed


# list


def listing(store):
    found = []
    for backup_id, files in catalogue(store).items():
        manifest = read_manifest(store, backup_id) if MANIFEST in files else None
        if manifest is None:
            found.append({"id": backup_id, "complete": False, "verified": False})
            continue
        whole = all(files.get(f["object"]) == f["compressed_size"] for f in manifest["files"])
        verified = manifest.get("integrity") == "ok" and whole
        found.append({**manifest, "complete": True, "verified": verified})
    return found


# restore


def resolve(store, wanted):
    backups = catalogue(store)
    if wanted == "latest":
        complete = [backup_id for backup_id, files in backups.items() if MANIFEST in files]
        if not complete:
            raise Failed(f"there is no complete backup at {store.where}")
        return complete[-1]
    if MANIFEST not in backups.get(wanted, {}):
        raise Failed(f"there is no backup {wanted} at {store.where}")
    return wanted


def fetch(store, manifest, work):
    """Download and check every file of a backup; nothing live is touched.

    The SHA-256 proves each file is, byte for byte, the snapshot that passed
    SQLite's full integrity check when the backup was taken; a quick check
    then confirms SQLite reads it.
    """
    backup_id = manifest["id"]
    for entry in manifest["files"]:
        packed = os.path.join(work, entry["object"])
        store.get(f"{backup_id}/{entry['object']}", packed)
        restored = os.path.join(work, entry["name"])
        packed_sha, raw_sha = unpack(packed, restored)
        os.remove(packed)
        if packed_sha != entry["compressed_sha256"]:
            raise Failed(f"{entry['object']} of backup {backup_id} fails its SHA-256 check")
        if raw_sha is None:
            raise Failed(f"{entry['object']} of backup {backup_id} does not decompress")
        if raw_sha != entry["sha256"]:
            raise Failed(f"{entry['name']} of backup {backup_id} fails its SHA-256 check")
        # Written to the disk while SQLite checks it: the restored file must
        # be there for good before it replaces the live one.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            flushed = pool.submit(flush, restored)
            revision, rows = inspect(restored, integrity="quick_check")
            flushed.result()
        if rows != entry["rows"] or revision != entry["schema_revision"]:
            raise Failed(f"{entry['name']} of backup {backup_id} does not match its manifest")
        say(f"{entry['name']}: SHA-256 and integrity ok")


def check_version(manifest, installed):
    made_by = manifest.get("mlflow_version")
    if made_by and installed and version_key(made_by) > version_key(installed):
        raise Failed(
            f"backup {manifest['id']} was made by MLflow {made_by}, newer than the installed "
            f"{installed}, which cannot read its schema; deploy MLflow {made_by} first "
            f"(invoke deploy --mlflow-version {made_by}), then restore"
        )


def systemctl(*argv):
    done = subprocess.run(["systemctl", *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Failed(f"systemctl {' '.join(argv)} failed: {done.stderr.strip()}")


def wait_healthy(url, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise Failed(f"{url} did not answer within {timeout:.0f}s after the restore")
        time.sleep(0.5)


def remove_sidecars(path):
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


def keep_pre_restore(data_dir, names, stamp):
    """Keep the live files aside (the server is stopped, so they are exact).

    A hard link costs nothing and is enough: the restored files replace the
    live ones by rename, so the kept names still point at the old contents.
    """
    folder = os.path.join(data_dir, f"pre-restore-{stamp}")
    os.makedirs(folder, mode=0o700)
    for name in names:
        for suffix in ("", "-wal"):
            live = os.path.join(data_dir, name + suffix)
            if os.path.exists(live):
                kept = os.path.join(folder, name + suffix)
                try:
                    os.link(live, kept)
                except OSError:
                    shutil.copy2(live, kept)
    return folder


def prune_pre_restore(data_dir):
    """Remove all but the newest pre-restore copies, once a restore has succeeded."""
    older = sorted(e for e in os.listdir(data_dir) if e.startswith("pre-restore-"))
    for stale in older[:-PRE_RESTORE_KEPT]:
        shutil.rmtree(os.path.join(data_dir, stale), ignore_errors=True)


def put_back(data_dir, names, folder):
    for name in names:
        live = os.path.join(data_dir, name)
        remove_sidecars(live)
        kept = os.path.join(folder, name)
        if not os.path.exists(kept):
            with contextlib.suppress(FileNotFoundError):
                os.remove(live)
            continue
        shutil.copy2(kept, live + ".back")
        os.replace(live + ".back", live)
        if os.path.exists(kept + "-wal"):
            shutil.copy2(kept + "-wal", live + "-wal")


def migrate(mlflow, path):
    done = subprocess.run(
        [mlflow, "db", "upgrade", f"sqlite:///{path}"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-2:])
        raise Failed(f"migrating the restored database failed: {tail}")


def restore(data_dir, store, wanted, *, service=None, health_url=None, health_timeout=120,
            installed=None, mlflow=None):  # fmt: skip
    backup_id = resolve(store, wanted)
    manifest = read_manifest(store, backup_id)
    check_version(manifest, installed)
    names = [entry["name"] for entry in manifest["files"]]
    if REQUIRED not in names:
        raise Failed(f"backup {backup_id} holds no {REQUIRED}")
    live = os.path.join(data_dir, REQUIRED)

    with locked(data_dir), staging(data_dir, f".restore-{backup_id}") as work:
        # Everything is checked, and migrated if older, before the server stops.
        fetch(store, manifest, work)
        migrated = False
        live_revision = inspect(live, integrity=None)[0] if os.path.exists(live) else None
        expected = manifest["rows"]
        if mlflow and live_revision and live_revision != manifest["schema_revision"]:
            say(f"migrating from schema {manifest['schema_revision']} to {live_revision}")
            migrate(mlflow, os.path.join(work, REQUIRED))
            expected = inspect(os.path.join(work, REQUIRED))[1]
            migrated = True
        owner = os.stat(live) if os.path.exists(live) else os.stat(data_dir)
        for name in names:
            staged = os.path.join(work, name)
            connection = connect(staged)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.close()
            remove_sidecars(staged)
            os.chown(staged, owner.st_uid, owner.st_gid)
            os.chmod(staged, 0o640)

        if service:
            say(f"stopping {service}")
            systemctl("stop", service)
        folder = keep_pre_restore(data_dir, names, utc_stamp(time.time()))
        try:
            for name in names:
                target = os.path.join(data_dir, name)
                remove_sidecars(target)
                os.replace(os.path.join(work, name), target)
            if service:
                systemctl("start", service)
            if health_url:
                wait_healthy(health_url, health_timeout)
            rows = inspect(live, integrity=None)[1]
            if rows != expected:
                raise Failed(f"the restored row counts {rows} differ from the manifest's")
        except (Failed, OSError, sqlite3.Error) as exc:
            say(f"restore failed ({exc}); putting the pre-restore database back")
            if service:
                subprocess.run(["systemctl", "stop", service], check=False)
            put_back(data_dir, names, folder)
            if service:
                subprocess.run(["systemctl", "start", service], check=False)
            raise Failed(
                f"{exc}; the pre-restore database was put back"
                + (f" and {service} started again" if service else "")
            ) from None

    prune_pre_restore(data_dir)
    return {"ok": True, "id": backup_id, "pre_restore": folder, "migrated": migrated,
            "rows": rows, "manifest": manifest}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(prog="backup.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["backup", "restore", "list"])
    parser.add_argument("--destination", required=True, help="s3://bucket/prefix or a directory")
    parser.add_argument("--data-dir", default="/var/lib/mlflow")
    parser.add_argument("--keep", type=int, default=14, help="complete backups to keep")
    parser.add_argument("--level", type=int, default=LEVEL, help="gzip level")
    parser.add_argument("--id", default="latest", help="the backup to restore, or latest")
    parser.add_argument("--service", help="the unit to stop and start around a restore")
    parser.add_argument("--health-url", help="must answer 200 after a restore")
    parser.add_argument("--health-timeout", type=float, default=120)
    parser.add_argument("--installed-version", default=mlflow_version())
    default_mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    parser.add_argument("--mlflow", default=default_mlflow, help="migrates an older backup")
    args = parser.parse_args(argv)

    try:
        store = store_for(args.destination)
        if args.command == "backup":
            result = backup(args.data_dir, store, args.keep, args.level)
        elif args.command == "list":
            result = {"ok": True, "backups": listing(store)}
        else:
            result = restore(
                args.data_dir,
                store,
                args.id,
                service=args.service,
                health_url=args.health_url,
                health_timeout=args.health_timeout,
                installed=args.installed_version,
                mlflow=args.mlflow if os.path.exists(args.mlflow) else None,
            )
    except Failed as exc:
        result = {"ok": False, "error": str(exc)}
    except Exception as exc:  # boto3 and OS errors: report them, not a traceback
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    if not result["ok"]:
        say(f"error: {result['error']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
