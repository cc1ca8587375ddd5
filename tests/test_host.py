"""The host plan and the files a deploy writes, checked without a host."""

import hashlib
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from ops import host
from ops.templating import env_value, exec_arg

RELEASE = host.Release(
    stack="test",
    mlflow_version="3.17.2",
    port=5000,
    workers=2,
    allowed_hosts=("203.0.113.7", "203.0.113.7:5000", "localhost", "localhost:5000"),
    artifacts_destination="s3://bucket/artifacts",
    server_env={"EXTRA": "a value with spaces"},
)


def facts_of(release, **changes):
    """The probe's answer for a host that already runs ``release``."""
    facts = {
        "packages": {name: True for name in host.PACKAGES},
        "user": True,
        "files": {f.path: f.sha256 for f in host.managed_files(release)},
        "releases": {release.release_name: release.install_record},
        "current": release.release_name,
        "uv": host.UV_VERSION,
        "schema": release.mlflow_version,
        "unit": {"ActiveState": "active", "UnitFileState": "enabled", "NRestarts": "0"},
        "disk": {"path": host.DATA_DIR, "free": 10 << 30, "total": 20 << 30},
    }
    facts.update(changes)
    return facts


FRESH_HOST = facts_of(
    RELEASE,
    packages={name: False for name in host.PACKAGES},
    user=False,
    files={},
    releases={},
    current=None,
    uv=None,
    schema=None,
    unit={"ActiveState": "inactive", "UnitFileState": ""},
)


def titles(steps):
    return [step.title for step in steps]


def test_a_fresh_host_gets_every_step_in_order():
    assert titles(host.plan(RELEASE, FRESH_HOST)) == [
        "install python3-venv",
        "create system user mlflow",
        f"write {host.UNIT_PATH}",
        f"write {host.ENV_PATH}",
        f"write {host.BACKUP_SCRIPT}",
        f"write {host.BACKUP_UNIT_PATH}",
        f"write {host.BACKUP_TIMER_PATH}",
        "reload systemd",
        f"install uv {host.UV_VERSION}",
        "install mlflow==3.17.2 boto3",
        f"migrate {host.DB_PATH}",
        f"switch to {RELEASE.release_name}",
        "enable mlflow",
        "restart mlflow",
        "enable mlflow-backup.timer",
        "take a first backup",
    ]


def test_a_new_backup_schedule_rewrites_the_timer_and_restarts_no_server():
    changed = host.Release(**{**RELEASE.__dict__, "backup_schedule": "hourly"})
    assert titles(host.plan(changed, facts_of(RELEASE))) == [
        f"write {host.BACKUP_TIMER_PATH}",
        "reload systemd",
        "enable mlflow-backup.timer",
    ]
    assert "OnCalendar=hourly" in host.managed_files(changed)[-1].content


def test_backups_go_to_the_artifact_bucket_or_stay_on_the_host():
    assert RELEASE.backup_destination == "s3://bucket/backups"
    local = host.Release(**{**RELEASE.__dict__, "artifacts_destination": "/srv/artifacts"})
    assert local.backup_destination == host.LOCAL_BACKUPS
    unit = next(f for f in host.managed_files(RELEASE) if f.path == host.BACKUP_UNIT_PATH)
    assert "User=mlflow" in unit.content
    assert "EnvironmentFile=/etc/mlflow/mlflow.env" in unit.content
    assert "--destination s3://bucket/backups" in unit.content


def test_a_host_that_runs_the_release_needs_nothing():
    assert host.plan(RELEASE, facts_of(RELEASE)) == []


def test_a_stopped_server_is_started_without_other_changes():
    facts = facts_of(RELEASE, unit={"ActiveState": "failed", "UnitFileState": "enabled"})
    assert titles(host.plan(RELEASE, facts)) == ["start mlflow"]


def test_a_changed_setting_rewrites_the_unit_and_restarts_once():
    changed = host.Release(**{**RELEASE.__dict__, "workers": 4})
    assert titles(host.plan(changed, facts_of(RELEASE))) == [
        f"write {host.UNIT_PATH}",
        "reload systemd",
        "restart mlflow",
    ]


def test_a_new_version_is_installed_migrated_and_the_older_releases_pruned():
    upgrade = host.Release(**{**RELEASE.__dict__, "mlflow_version": "3.18.0"})
    older = {"venv-3.16.0-0a1b2c3d": "x", RELEASE.release_name: RELEASE.install_record}
    steps = titles(host.plan(upgrade, facts_of(RELEASE, releases=older)))
    assert steps[-1] == "remove old releases venv-3.16.0-0a1b2c3d"  # 3.17.2 stays for a rollback
    switch = f"switch to {upgrade.release_name}"
    assert steps.index("migrate /var/lib/mlflow/mlflow.db") < steps.index(switch)
    assert steps.count("restart mlflow") == 1


def test_the_release_before_the_running_one_is_kept_by_later_deploys():
    older = "venv-3.16.0-0a1b2c3d"
    releases = {older: "x", RELEASE.release_name: RELEASE.install_record}
    facts = facts_of(RELEASE, releases=releases, links={host.PREVIOUS: older})
    assert host.plan(RELEASE, facts) == []  # nothing to do, nothing pruned


def test_an_interrupted_install_is_redone():
    facts = facts_of(RELEASE, releases={})  # no marker: the install did not finish
    assert "install mlflow==3.17.2 boto3" in titles(host.plan(RELEASE, facts))


def test_a_release_installed_without_its_bytecode_is_installed_again_beside_it():
    # A release the server's user cannot write must bring its bytecode, or
    # every start compiles MLflow again. The running one is left as it is.
    old = {"venv-3.17.2": "mlflow==3.17.2 boto3"}
    facts = facts_of(RELEASE, releases=old, current="venv-3.17.2")
    assert titles(host.plan(RELEASE, facts)) == [
        "install mlflow==3.17.2 boto3",
        f"switch to {RELEASE.release_name}",
        "restart mlflow",
    ]
    assert RELEASE.release_name != "venv-3.17.2"
    assert "--compile-bytecode" in RELEASE.install_record


def test_the_job_runner_is_off_unless_asked_for_and_turning_it_on_restarts_once():
    def environment(release):
        env_file = next(f for f in host.managed_files(release) if f.path == host.ENV_PATH)
        return env_file.content.splitlines()

    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in environment(RELEASE)
    jobs = host.Release(**{**RELEASE.__dict__, "jobs": True})
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true" in environment(jobs)
    assert titles(host.plan(jobs, facts_of(RELEASE))) == [
        f"write {host.ENV_PATH}",
        "restart mlflow",
    ]


def test_the_server_command_proxies_artifacts_and_allows_the_public_address():
    argv = host.server_command(RELEASE)
    assert argv[0].startswith("/")
    assert argv[argv.index("--backend-store-uri") + 1] == "sqlite:////var/lib/mlflow/mlflow.db"
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://bucket/artifacts"
    assert "--default-artifact-root" not in argv  # that would send clients straight to S3
    allowed = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert {"203.0.113.7", "203.0.113.7:5000"} <= set(allowed)


def test_the_environment_file_is_private_and_holds_the_extra_environment():
    env_file = next(f for f in host.managed_files(RELEASE) if f.path == host.ENV_PATH)
    assert env_file.mode == "0600"
    assert 'EXTRA="a value with spaces"' in env_file.content.splitlines()


@pytest.mark.parametrize("value", ["plain", "two words", 'quote " and \\ slash', "$HOME"])
def test_quoted_values_read_back_as_written(value):
    assert shlex.split(env_value(value)) == [value]


def test_a_percent_sign_is_escaped_on_the_command_line():
    assert exec_arg("100%") == "100%%"


def systemd_root(tmp_path: Path, binary: str, paths: set[str]) -> Path:
    """A root with the system's units, the release's ``binary`` and the files at ``paths``.

    In it, ``systemd-analyze verify --root`` checks units as it would on the host.
    """
    root = tmp_path / "root"
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    program = root / host.CURRENT.lstrip("/") / "bin" / binary
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    for managed in host.managed_files(RELEASE):
        if managed.path in paths:
            (root / managed.path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (root / managed.path.lstrip("/")).write_text(managed.content)
    return root


def test_the_rendered_unit_passes_systemd_analyze_verify(tmp_path):
    root = systemd_root(tmp_path, "mlflow", {host.UNIT_PATH})
    done = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", host.UNIT_PATH],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # warnings, such as an unknown key, count as failures


def test_the_probe_reports_files_releases_and_markers_with_the_standard_library(tmp_path):
    # The probe travels to hosts that have nothing but Python, so it runs
    # here isolated (-I): no site-packages, no toolkit on the path.
    (tmp_path / "releases/venv-1.0").mkdir(parents=True)
    (tmp_path / "releases/venv-1.0/marker").write_text("mlflow==1.0\n")
    (tmp_path / "releases/venv-2.0").mkdir()  # no marker: an unfinished install
    (tmp_path / "releases/current").symlink_to("venv-1.0")
    (tmp_path / "unit").write_text("content")
    request = {
        "packages": [],
        "user": "root",
        "files": [str(tmp_path / "unit"), str(tmp_path / "absent")],
        "releases": str(tmp_path / "releases"),
        "marker": "marker",
        "current": str(tmp_path / "releases/current"),
        "uv": str(tmp_path / "no-uv"),
        "schema_marker": str(tmp_path / "absent"),
        "unit": "no-such-unit",
        "data_dir": str(tmp_path / "data/not/made/yet"),
    }
    done = subprocess.run(
        ["/usr/bin/python3", "-I", "-", json.dumps(request)],
        input=Path(host.PROBE).read_text(),
        capture_output=True,
        text=True,
        check=True,
    )
    facts = json.loads(done.stdout)
    assert facts["user"] is True
    assert facts["files"] == {
        str(tmp_path / "unit"): hashlib.sha256(b"content").hexdigest(),
        str(tmp_path / "absent"): None,
    }
    assert facts["releases"] == {"venv-1.0": "mlflow==1.0"}
    assert facts["current"] == "venv-1.0"
    assert facts["uv"] is None and facts["schema"] is None
    assert facts["disk"]["path"] == str(tmp_path)


def test_the_rendered_backup_service_and_timer_pass_systemd_analyze_verify(tmp_path):
    root = systemd_root(tmp_path, "python", host.UNIT_FILES)
    done = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", host.BACKUP_UNIT_PATH,
         host.BACKUP_TIMER_PATH],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
