"""The main job end to end, as a user runs it: the tasks against the sandbox.

Every step runs the real ``invoke`` command in a subprocess with the
environment ``invoke sandbox.env`` prints; the guest is a booted Debian with
systemd and sshd, AWS is a moto server, and MLflow is the real server.
The tests build on each other in file order: provision and deploy once, then
look at the result, disturb it, and watch it recover.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests
from fabric import Config, Connection

from ops import health

ROOT = Path(__file__).resolve().parent.parent
CHECKS = list(health.CHECKS)


def invoke(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and done.returncode != 0:
        pytest.fail(f"invoke {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def guest(env: dict[str, str], command: str, *, warn: bool = False) -> str:
    """Run a command in the guest over SSH as the sandbox's admin user."""
    user, _, address = env["MLFLOW_OPS_SSH"].partition("@")
    host, _, port = address.partition(":")
    with Connection(
        host,
        user=user,
        port=int(port),
        config=Config(overrides={"load_ssh_configs": False}),
        connect_kwargs={
            "key_filename": env["MLFLOW_OPS_SSH_KEY"],
            "look_for_keys": False,
            "allow_agent": False,
        },
    ) as c:
        return c.run(command, hide=True, warn=warn, in_stream=False).stdout


def unit(env: dict[str, str]) -> dict[str, str]:
    shown = guest(env, "systemctl show mlflow --property=MainPID,NRestarts,ActiveState")
    return dict(line.split("=", 1) for line in shown.splitlines())


def seconds_until_healthy(url: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if requests.get(f"{url}/health", timeout=5).text.strip() == "OK":
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} was not healthy within {timeout}s")


def moto_s3(env: dict[str, str]):
    """An S3 client of the sandbox's moto server, with its test credentials."""
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def status(env: dict[str, str]) -> tuple[int, dict[str, dict]]:
    done = invoke(env, "status", "--json", check=False)
    return done.returncode, {check["name"]: check for check in json.loads(done.stdout)}


def exported(output: str) -> dict[str, str]:
    """The variables of ``export NAME=VALUE`` lines, as a shell would read them."""
    lines = [line for line in output.splitlines() if line.startswith("export ")]
    return dict(shlex.split(line)[1].split("=", 1) for line in lines)


def login(env: dict[str, str]) -> tuple[str, str]:
    return env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]


@pytest.fixture(scope="module")
def stack(sandbox_env: dict[str, str]) -> dict[str, str]:
    """A provisioned and deployed stack in the sandbox; its environment, with the admin login."""
    invoke(sandbox_env, "provision")
    invoke(sandbox_env, "deploy")
    return {**sandbox_env, **exported(invoke(sandbox_env, "client-env").stdout)}


def test_status_passes_every_check_after_provision_and_deploy(stack):
    code, checks = status(stack)
    assert list(checks) == CHECKS
    assert {name: check["outcome"] for name, check in checks.items()} == dict.fromkeys(CHECKS, "ok")
    assert code == 0


def test_provision_run_again_creates_nothing(stack):
    done = invoke(stack, "provision")
    assert "created" not in done.stdout
    assert "unchanged" in done.stdout


def test_a_client_without_aws_credentials_logs_an_artifact_that_lands_in_the_bucket(stack):
    client_env = {k: v for k, v in stack.items() if not k.startswith("AWS_")}
    script = (
        "import mlflow\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_metric('loss', 0.25)\n"
        "    mlflow.log_text('hello from a client', 'notes/hello.txt')\n"
        "print(run.info.run_id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=client_env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip().splitlines()[-1]

    s3 = moto_s3(stack)
    bucket = next(b["Name"] for b in s3.list_buckets()["Buckets"] if "mlflow-ops-" in b["Name"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="artifacts/")["Contents"]]
    assert any(key.startswith("artifacts/") and key.endswith(f"{run_id}/artifacts/notes/hello.txt")
               for key in keys), keys  # fmt: skip

    metric = requests.get(
        f"{stack['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/runs/get",
        params={"run_id": run_id},
        auth=login(stack),
        timeout=30,
    ).json()["run"]["data"]["metrics"]
    assert metric == [{"key": "loss", "value": 0.25, "timestamp": metric[0]["timestamp"],
                       "step": 0}]  # fmt: skip


def test_the_api_refuses_requests_without_a_login_and_with_the_old_default(stack):
    search = f"{stack['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    body = {"max_results": 1}
    assert requests.post(search, json=body, timeout=30).status_code == 401
    old_default = ("admin", "password1234")
    assert requests.post(search, json=body, auth=old_default, timeout=30).status_code == 401
    assert requests.post(search, json=body, auth=login(stack), timeout=30).status_code == 200


def test_the_admin_password_reaches_the_host_only_in_the_private_environment_file(stack):
    password = stack["MLFLOW_TRACKING_PASSWORD"]
    assert len(password) >= 24
    assert password in guest(stack, "sudo cat /etc/mlflow/mlflow.env")
    assert password not in guest(stack, "ps -eo args")  # on no command line
    assert password not in guest(stack, "sudo journalctl --no-pager")


def test_sandbox_env_gives_the_login_once_the_server_has_one(stack, sandbox):
    lines = exported(invoke(stack, "sandbox.env", "--state-dir", str(sandbox.state_dir)).stdout)
    assert login(lines) == login(stack)


def test_a_teammate_logs_runs_with_only_what_client_env_prints_until_removed(stack):
    invoke(stack, "users.add", "ada", "--permission", "EDIT")
    try:
        teammate = {k: v for k, v in stack.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        teammate.update(exported(invoke(stack, "client-env", "--user", "ada").stdout))
        assert teammate["MLFLOW_TRACKING_USERNAME"] == "ada"
        script = "import mlflow\nwith mlflow.start_run():\n    mlflow.log_param('who', 'ada')\n"
        done = subprocess.run(
            [sys.executable, "-c", script], env=teammate, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr

        again = invoke(stack, "users.add", "ada", check=False)
        assert again.returncode == 1
        assert "already exists" in again.stderr
        unchanged = exported(invoke(stack, "client-env", "--user", "ada").stdout)
        assert login(unchanged) == login(teammate)
    finally:
        invoke(stack, "users.remove", "ada")

    # Each worker may remember a checked password for half a minute.
    deadline = time.monotonic() + 45
    url = f"{stack['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    while requests.post(url, json={}, auth=login(teammate), timeout=30).status_code != 401:
        assert time.monotonic() < deadline, "a removed user could still log in"
        time.sleep(1)
    assert invoke(stack, "client-env", "--user", "ada", check=False).returncode == 1


def test_the_unit_on_the_host_verifies_and_its_environment_file_is_private(stack):
    assert guest(stack, "systemd-analyze verify /etc/systemd/system/mlflow.service 2>&1") == ""
    assert guest(stack, "sudo stat -c '%a %U' /etc/mlflow/mlflow.env").strip() == "600 root"
    assert "Restart=always" in guest(stack, "cat /etc/systemd/system/mlflow.service")


def test_the_running_server_is_hardened_to_an_exposure_of_2_or_less(stack):
    report = guest(stack, "sudo systemd-analyze security mlflow --no-pager")
    exposure = float(report.rsplit("Overall exposure level for mlflow.service:", 1)[1].split()[0])
    assert exposure <= 2.0, report


def test_a_second_deploy_restarts_nothing_and_is_quick(stack):
    before = unit(stack)
    started = time.monotonic()
    done = invoke(stack, "deploy")
    took = time.monotonic() - started
    assert "unchanged" in done.stdout
    assert unit(stack)["MainPID"] == before["MainPID"]
    assert took < 30, f"a deploy with nothing to do took {took:.1f}s"


def test_a_dry_run_lists_the_change_and_makes_none(stack):
    before = unit(stack)
    done = invoke(stack, "deploy", "--workers", "3", "--dry-run")
    assert "would write /etc/systemd/system/mlflow.service" in done.stdout
    assert "would restart mlflow" in done.stdout
    assert unit(stack)["MainPID"] == before["MainPID"]
    assert "--workers 2" in guest(stack, "cat /etc/systemd/system/mlflow.service")


def test_a_changed_setting_restarts_the_server_once(stack):
    before = unit(stack)
    invoke(stack, "deploy", "--workers", "3")
    after = unit(stack)
    assert after["MainPID"] != before["MainPID"]
    assert after["NRestarts"] == before["NRestarts"]  # restarted by us, not by a crash
    assert "--workers 3" in guest(stack, "cat /etc/systemd/system/mlflow.service")
    invoke(stack, "deploy")  # back to the configured two workers


def test_status_names_the_failed_check_when_the_server_is_stopped(stack):
    guest(stack, "sudo systemctl stop mlflow")
    try:
        code, checks = status(stack)
        assert code != 0
        assert checks["unit"]["outcome"] == "FAILED"
        assert "journalctl" in checks["unit"]["hint"]
        assert checks["health"]["outcome"] == "FAILED"
        assert checks["instance"]["outcome"] == "ok"
    finally:
        guest(stack, "sudo systemctl start mlflow")
    seconds_until_healthy(stack["MLFLOW_TRACKING_URI"], 180)


def test_the_server_is_healthy_again_within_30s_after_kill_9(stack):
    seconds_until_healthy(stack["MLFLOW_TRACKING_URI"], 180)
    before = unit(stack)
    started = time.monotonic()
    guest(stack, f"sudo kill -9 {before['MainPID']}")
    # The killed server's workers may answer for a moment: wait for the new one.
    while unit(stack)["MainPID"] in {before["MainPID"], "0"}:
        assert time.monotonic() - started < 30, "systemd did not start the server again"
        time.sleep(0.5)
    seconds_until_healthy(stack["MLFLOW_TRACKING_URI"], 60)
    took = time.monotonic() - started
    assert int(unit(stack)["NRestarts"]) == int(before["NRestarts"]) + 1
    assert took < 30, f"the server took {took:.1f}s to come back"


def test_the_server_comes_back_after_the_guest_restarts_with_no_command_from_us(stack, sandbox):
    before = sandbox.guest_process()
    # Reboot a moment later, from a timer, so our SSH session ends first.
    guest(
        stack, "sudo systemd-run --on-active=1 --timer-property=AccuracySec=100ms systemctl reboot"
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = sandbox.guest_process()
        if now is not None and now.pid != before.pid:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the guest did not restart")
    seconds_until_healthy(stack["MLFLOW_TRACKING_URI"], 180)
    code, checks = status(stack)
    assert code == 0, checks


def test_destroy_removes_the_stack_and_keeps_the_bucket(stack):
    done = invoke(stack, "destroy", "--yes")
    assert "kept" in done.stdout
    code, checks = status(stack)
    assert code != 0
    assert checks["instance"]["outcome"] == "FAILED"
    assert any("mlflow-ops-" in b["Name"] for b in moto_s3(stack).list_buckets()["Buckets"])
