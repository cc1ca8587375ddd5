"""The local sandbox: a real Debian guest under systemd, moto, and the environment for both."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import fabric
import pytest
import tenacity
import yaml

import ops.config
import ops.sandbox
from ops.errors import OpsError

PROBE_UNIT = """\
[Unit]
Description=Proves that an enabled unit comes back after a reboot

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true

[Install]
WantedBy=multi-user.target
"""


def connect(sandbox: ops.sandbox.Sandbox) -> fabric.Connection:
    """A connection to the guest that uses the sandbox key and nothing of ``~/.ssh``."""
    return fabric.Connection(
        "127.0.0.1",
        user=ops.sandbox.GUEST_USER,
        port=sandbox.ssh_port,
        # Lazy: read no ssh_config and no Fabric configuration file of the developer's;
        # and no stdin, which pytest has closed.
        config=fabric.Config(lazy=True, overrides={"run": {"in_stream": False}}),
        connect_timeout=10,
        connect_kwargs={
            "key_filename": str(sandbox.key_path),
            "look_for_keys": False,
            "allow_agent": False,
        },
    )


def shell_env(exports: str, inherited: dict[str, str]) -> dict[str, str]:
    """The environment bash has after ``eval``-ing ``exports``, starting from ``inherited``."""
    shell = subprocess.run(
        ["bash", "-c", 'eval "$1" && env -0', "bash", exports],
        env=inherited,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(item.split("=", 1) for item in shell.stdout.split("\0") if item)


def test_the_guest_answers_ssh_as_admin_with_the_sandbox_key_and_sudo_needs_no_password(sandbox):
    with connect(sandbox) as guest:
        assert guest.run("id -un", hide=True).stdout.strip() == "admin"
        assert guest.run("sudo -n true", hide=True, warn=True).ok


def test_systemd_is_pid_1_in_the_guest_and_the_system_is_up(sandbox):
    with connect(sandbox) as guest:
        assert guest.run("cat /proc/1/comm", hide=True).stdout.strip() == "systemd"
        state = guest.run("systemctl is-system-running --wait", hide=True, warn=True)
    assert state.stdout.strip() in {"running", "degraded"}


def test_boto3_with_the_sandbox_environment_finds_the_registered_image(sandbox_env):
    find_image = (
        "import boto3, os; "
        "images = boto3.client('ec2').describe_images(ImageIds=[os.environ['MLFLOW_OPS_AMI']]); "
        "print(images['Images'][0]['Name'])"
    )
    found = subprocess.run(
        [sys.executable, "-c", find_image],
        env=sandbox_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == ops.sandbox.IMAGE_NAME


def test_the_exports_give_a_shell_the_sandbox_environment_and_drop_a_profile(sandbox):
    exports = ops.sandbox.env_exports(sandbox)
    inherited = {"PATH": os.environ["PATH"], "AWS_PROFILE": "work", "AWS_SESSION_TOKEN": "t"}

    env = shell_env(exports, inherited)

    assert all(line.startswith(("export ", "unset ")) for line in exports.splitlines())
    assert "AWS_PROFILE" not in env
    assert "AWS_SESSION_TOKEN" not in env
    moto = f"http://127.0.0.1:{sandbox.moto_port}"
    assert env["AWS_ENDPOINT_URL"] == moto
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("testing", "testing")
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["AWS_CONFIG_FILE"] == env["AWS_SHARED_CREDENTIALS_FILE"] == "/dev/null"
    assert env["MLFLOW_OPS_SSH"] == f"admin@127.0.0.1:{sandbox.ssh_port}"
    assert env["MLFLOW_OPS_SSH_KEY"] == str(sandbox.state_dir / "id_ed25519")
    assert env["MLFLOW_OPS_AMI"] == sandbox.ami_id
    assert env["MLFLOW_OPS_ALLOWED_CIDR"] == "127.0.0.1/32"
    assert env["MLFLOW_OPS_PORT"] == str(sandbox.mlflow_port)
    assert env["MLFLOW_OPS_HTTPS_PORT"] == str(sandbox.https_port)
    assert json.loads(env["MLFLOW_OPS_SERVER_ENV"]) == {
        "AWS_ENDPOINT_URL": moto,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    assert env["MLFLOW_TRACKING_URI"] == f"https://127.0.0.1:{sandbox.https_port}"


def test_the_exports_resolve_to_settings_that_point_the_toolkit_at_the_sandbox(sandbox):
    env = shell_env(ops.sandbox.env_exports(sandbox), {"PATH": os.environ["PATH"]})
    defaults = yaml.safe_load(ops.config.PROJECT_CONFIG.read_text())[ops.config.CONFIG_KEY]

    settings = ops.config.resolve(file_values=defaults, env=env)

    assert ops.config.parse_host(settings.ssh, settings.ssh_user) == (
        "admin",
        "127.0.0.1",
        sandbox.ssh_port,
    )
    assert settings.ssh_key == sandbox.key_path
    assert settings.ami == sandbox.ami_id
    assert settings.port == sandbox.mlflow_port
    assert settings.https_port == sandbox.https_port
    assert settings.server_env["AWS_ENDPOINT_URL"] == sandbox.moto_url


def test_the_exports_leave_out_the_ca_bundle_when_the_machine_has_none(
    sandbox, monkeypatch, tmp_path
):
    monkeypatch.setattr(ops.sandbox, "SYSTEM_CA_BUNDLE", tmp_path / "missing.crt")

    assert "MLFLOW_OPS_CA_BUNDLE" not in ops.sandbox.env_exports(sandbox)


def test_a_reboot_in_the_guest_brings_it_back_with_the_units_enabled_before(sandbox):
    guest_before = sandbox.guest_process()
    with connect(sandbox) as guest:
        guest.put(io.StringIO(PROBE_UNIT), "/tmp/sandbox-probe.service")
        guest.run(
            "sudo -n install -m 0644 /tmp/sandbox-probe.service /etc/systemd/system/"
            " && sudo -n systemctl enable --now sandbox-probe.service"
            # /run is emptied by a reboot: this file tells the old boot from the new.
            " && sudo -n touch /run/sandbox-before-reboot"
            # Later, so this command returns first; and at once, not in systemd's
            # default timer accuracy of a minute.
            " && sudo -n systemd-run --on-active=1 --timer-property=AccuracySec=100ms"
            " systemctl reboot",
            hide=True,
        )

    for attempt in tenacity.Retrying(
        stop=tenacity.stop_after_delay(60), wait=tenacity.wait_fixed(0.5), reraise=True
    ):
        with attempt, connect(sandbox) as guest:
            guest.run("test ! -e /run/sandbox-before-reboot", hide=True)
            probe = guest.run("systemctl is-active sandbox-probe.service", hide=True, warn=True)

    assert probe.stdout.strip() == "active"
    assert sandbox.supervisor.alive()
    assert sandbox.guest_process() not in (None, guest_before)


def test_up_again_reuses_the_running_sandbox_and_says_so(sandbox, capsys):
    again = ops.sandbox.up(sandbox.state_dir)

    assert again.supervisor == sandbox.supervisor
    assert again.moto == sandbox.moto
    assert (again.moto_port, again.ssh_port, again.mlflow_port, again.ami_id) == (
        sandbox.moto_port,
        sandbox.ssh_port,
        sandbox.mlflow_port,
        sandbox.ami_id,
    )
    output = " ".join(capsys.readouterr().out.split())
    assert "already up: reused everything" in output


def test_up_restarts_a_dead_moto_and_down_leaves_no_process_it_started(tmp_path):
    try:
        ops.sandbox.check_host()
    except OpsError as exc:
        pytest.skip(f"this machine cannot run the sandbox: {exc.message}")
    state_dir = tmp_path / "sandbox"
    started = []
    try:
        first = ops.sandbox.up(state_dir)
        os.kill(first.moto.pid, signal.SIGKILL)
        assert first.moto.wait(10)

        again = ops.sandbox.up(state_dir)

        assert again.moto.alive() and again.moto != first.moto
        assert again.supervisor == first.supervisor
        images = ops.sandbox.ec2_client(again).describe_images(ImageIds=[again.ami_id])
        assert images["Images"][0]["Name"] == ops.sandbox.IMAGE_NAME
        started = again.processes()
        assert len(started) == 3  # moto, the supervisor, and systemd-nspawn
    finally:
        ops.sandbox.down(state_dir)

    assert [process for process in started if process.alive()] == []
    assert not state_dir.exists()
    assert ops.sandbox.rootfs_dir().is_dir()


def test_down_when_nothing_is_up_says_so_and_succeeds(tmp_path, capsys):
    ops.sandbox.down(tmp_path)

    assert "nothing to stop" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="checked after Linux and root"
)
def test_up_on_a_machine_without_nspawn_names_the_missing_commands_and_the_fix():
    def which(command: str) -> str | None:
        return None if command in {"systemd-nspawn", "debootstrap"} else f"/usr/bin/{command}"

    with pytest.raises(OpsError) as failure:
        ops.sandbox.check_host(which=which)

    assert "systemd-nspawn, debootstrap" in failure.value.message
    assert "make sandbox-deps" in failure.value.hint


def test_the_root_filesystem_cache_is_named_by_its_recipe_under_the_xdg_cache(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = ops.sandbox.rootfs_key()
    assert ops.sandbox.rootfs_dir() == tmp_path / "mlflow-ops" / "rootfs" / key

    monkeypatch.setattr(ops.sandbox, "CUSTOMISATION_VERSION", ops.sandbox.CUSTOMISATION_VERSION + 1)
    assert ops.sandbox.rootfs_key() != key
