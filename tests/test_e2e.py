"""The main job end to end, as a user runs it: the tasks against the sandbox.

Every step runs the real ``invoke`` command in a subprocess with the
environment ``invoke sandbox.env`` prints; the guest is a booted Debian with
systemd and sshd, AWS is a moto server, and MLflow is the real server.
The tests build on each other in file order: provision and deploy once, then
look at the result, disturb it, and watch it recover.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
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


def trusted(env: dict[str, str]) -> str | bool:
    """What a client trusts for the server: the certificate client-env wrote, if any."""
    return env.get("MLFLOW_TRACKING_SERVER_CERT_PATH", True)


def seconds_until_healthy(env: dict[str, str], timeout: float) -> float:
    url = env["MLFLOW_TRACKING_URI"]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if requests.get(f"{url}/health", timeout=5, verify=trusted(env)).text.strip() == "OK":
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


def test_the_server_answers_only_over_tls_and_mlflow_listens_on_loopback_only(stack):
    url = stack["MLFLOW_TRACKING_URI"]
    assert url.startswith("https://")
    assert requests.get(f"{url}/health", timeout=30, verify=trusted(stack)).text.strip() == "OK"
    # Without the stack's certificate, a client refuses the server.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{url}/health", timeout=30)
    plain = requests.get(f"{url.replace('https://', 'http://')}/health", timeout=30)
    assert plain.status_code == 400 and plain.text.strip() != "OK"

    port = stack["MLFLOW_OPS_PORT"]
    listening = guest(stack, f"ss -Hltn 'sport = :{port}'").split()
    assert [word for word in listening if word.endswith(f":{port}")] == [f"127.0.0.1:{port}"]


def test_deploy_printed_the_fingerprint_of_the_certificate_clients_are_told_to_trust(stack):
    done = invoke(stack, "deploy")
    cert = Path(stack["MLFLOW_TRACKING_SERVER_CERT_PATH"]).read_bytes()
    digest = x509.load_pem_x509_certificate(cert).fingerprint(hashes.SHA256()).hex().upper()
    fingerprint = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    assert f"self-signed certificate SHA-256 fingerprint: {fingerprint}" in done.stdout


class Generated:
    """``size`` bytes made chunk by chunk as they are read, never held at once, and hashed."""

    def __init__(self, size: int, chunk: int = 1 << 20):
        self.size, self.chunk, self.sent = size, chunk, 0
        self.digest = hashlib.sha256()
        self.block = os.urandom(chunk)

    def __len__(self) -> int:  # lets requests send a Content-Length
        return self.size

    def read(self, _: int = -1) -> bytes:
        if self.sent >= self.size:
            return b""
        # Each chunk differs, so no layer can shortcut a repeated block.
        piece = (self.sent.to_bytes(8, "big") + self.block[8:])[: self.size - self.sent]
        self.sent += len(piece)
        self.digest.update(piece)
        return piece


def test_a_1_gb_artifact_makes_the_round_trip_through_the_proxy_intact(stack):
    size = 1 << 30
    body = Generated(size)
    path = f"big/{os.getpid()}.bin"
    url = f"{stack['MLFLOW_TRACKING_URI']}/api/2.0/mlflow-artifacts/artifacts/{path}"
    options = {"auth": login(stack), "verify": trusted(stack), "timeout": 600}
    started = time.monotonic()
    try:
        requests.put(url, data=body, **options).raise_for_status()
        received, length = hashlib.sha256(), 0
        with requests.get(url, stream=True, **options) as answer:
            answer.raise_for_status()
            for piece in answer.iter_content(1 << 20):
                received.update(piece)
                length += len(piece)
    finally:
        requests.delete(url, **options)
    took = time.monotonic() - started
    assert (length, received.hexdigest()) == (size, body.digest.hexdigest())
    assert took < 600, f"the round trip took {took:.0f}s"


def certificate_files(tmp_path: Path, *, expired: bool = False, mismatched: bool = False):
    """A certificate and key for the guest, written to files; broken as asked."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=90)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(end)
        .sign(key, hashes.SHA256())
    )
    if mismatched:
        key = ec.generate_private_key(ec.SECP256R1())
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        pytest.param({"mismatched": True}, "private key does not match", id="mismatched key"),
        pytest.param({"expired": True}, "expired on", id="expired"),
    ],
)
def test_a_bad_certificate_is_refused_and_nothing_changes_on_the_host(
    stack, tmp_path, broken, message
):
    files = "/etc/mlflow/tls/* /etc/nginx/sites-available/mlflow /etc/systemd/system/mlflow.service"
    before = guest(stack, f"sudo sha256sum {files}"), unit(stack)["MainPID"]
    cert, key = certificate_files(tmp_path, **broken)
    done = invoke(stack, "deploy", "--tls-cert", cert, "--tls-key", key, check=False)
    assert done.returncode == 1
    assert message in done.stderr + done.stdout
    assert "hint:" in done.stderr + done.stdout
    assert (guest(stack, f"sudo sha256sum {files}"), unit(stack)["MainPID"]) == before


def test_a_tunnel_over_ssh_reaches_the_server_with_a_login(stack):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        local_port = sock.getsockname()[1]
    tunnel = subprocess.Popen(
        [sys.executable, "-m", "invoke", "tunnel", "--local-port", str(local_port)],
        cwd=ROOT,
        env=stack,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{local_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = requests.post(
                    f"{url}/api/2.0/mlflow/experiments/search",
                    json={"max_results": 1},
                    auth=login(stack),
                    timeout=10,
                )
                break
            except requests.ConnectionError:
                assert tunnel.poll() is None, tunnel.communicate()
                assert time.monotonic() < deadline, "the tunnel did not open"
                time.sleep(0.5)
        assert answer.status_code == 200, answer.text
    finally:
        os.kill(tunnel.pid, signal.SIGINT)  # as Ctrl-C would
        out, err = tunnel.communicate(timeout=30)
    assert f"export MLFLOW_TRACKING_URI={url}" in out, err


def test_provision_private_opens_only_ssh_and_a_later_provision_opens_https_again(stack):
    ec2 = boto3.client(
        "ec2",
        endpoint_url=stack["AWS_ENDPOINT_URL"],
        region_name=stack["AWS_REGION"],
        aws_access_key_id=stack["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack["AWS_SECRET_ACCESS_KEY"],
    )

    def opened():
        groups = ec2.describe_security_groups(
            Filters=[{"Name": "tag:mlflow-ops:stack", "Values": [stack["MLFLOW_OPS_STACK"]]}]
        )["SecurityGroups"]
        return sorted(rule["FromPort"] for group in groups for rule in group["IpPermissions"])

    invoke(stack, "provision", "--private")
    assert opened() == [22]
    invoke(stack, "provision")
    assert opened() == sorted([22, int(stack["MLFLOW_OPS_HTTPS_PORT"])])


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
        verify=trusted(stack),
    ).json()["run"]["data"]["metrics"]
    assert metric == [{"key": "loss", "value": 0.25, "timestamp": metric[0]["timestamp"],
                       "step": 0}]  # fmt: skip


def test_the_api_refuses_requests_without_a_login_and_with_the_old_default(stack):
    search = f"{stack['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    body = {"max_results": 1}
    post = functools.partial(requests.post, search, json=body, timeout=30, verify=trusted(stack))
    assert post().status_code == 401
    assert post(auth=("admin", "password1234")).status_code == 401
    assert post(auth=login(stack)).status_code == 200


def test_the_admin_password_reaches_the_host_only_in_the_private_environment_file(stack):
    password = stack["MLFLOW_TRACKING_PASSWORD"]
    assert len(password) >= 24
    assert password in guest(stack, "sudo cat /etc/mlflow/mlflow.env")
    assert password not in guest(stack, "ps -eo args")  # on no command line
    assert password not in guest(stack, "sudo journalctl --no-pager")


def test_sandbox_env_gives_the_login_and_certificate_once_the_server_has_them(stack, sandbox):
    lines = exported(invoke(stack, "sandbox.env", "--state-dir", str(sandbox.state_dir)).stdout)
    assert login(lines) == login(stack)
    assert lines["MLFLOW_TRACKING_URI"] == stack["MLFLOW_TRACKING_URI"]
    certificate = Path(lines["MLFLOW_TRACKING_SERVER_CERT_PATH"]).read_text()
    assert certificate == Path(stack["MLFLOW_TRACKING_SERVER_CERT_PATH"]).read_text()


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
    while (
        requests.post(url, json={}, auth=login(teammate), timeout=30, verify=trusted(stack))
    ).status_code != 401:
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


def test_the_hosts_key_is_pinned_and_a_host_with_another_key_is_refused(stack):
    known = Path(stack["XDG_CONFIG_HOME"]) / "mlflow-ops" / "known_hosts"
    name = "[127.0.0.1]:" + stack["MLFLOW_OPS_SSH"].rsplit(":", 1)[1]
    pinned = [line.split()[1:3] for line in known.read_text().splitlines() if name in line]
    host_keys = guest(stack, "cat /etc/ssh/ssh_host_*_key.pub").splitlines()
    assert len(pinned) == 1 and pinned[0] in [line.split()[:2] for line in host_keys]

    pinned_file = known.read_text()
    impostor = Path(stack["MLFLOW_OPS_SSH_KEY"] + ".pub").read_text().split()[:2]
    known.write_text(f"{name} {' '.join(impostor)}\n")
    try:
        refused = invoke(stack, "deploy", check=False)
        assert refused.returncode == 1
        presented, pinned = re.search(
            rf"the SSH host key of {re.escape(name)} is (SHA256:\S+), not the (SHA256:\S+) pinned",
            refused.stderr,
        ).groups()
        assert presented != pinned
        assert "Traceback" not in refused.stderr
        code, checks = status(stack)
        assert code == 1 and checks["ssh"]["outcome"] == "FAILED"

        # What the hint says to do once the machine is known to be new.
        forget = refused.stderr.split("forget the old key with `", 1)[1].split("`", 1)[0]
        subprocess.run(forget, shell=True, check=True, capture_output=True)
        assert status(stack)[0] == 0  # the JSON on standard output, the new pin on error
        assert known.read_text().count(name) == 1
    finally:
        known.write_text(pinned_file)


def test_the_server_runs_without_the_job_runner_from_compiled_bytecode(stack):
    processes = guest(stack, "ps -u mlflow -o args=")
    assert "uvicorn" in processes
    assert "huey" not in processes and "_job_runner" not in processes, processes
    site = "/opt/mlflow/current/lib/python3*/site-packages/mlflow/server"
    assert guest(stack, f"find {site} -name '*.pyc' | head -1").strip()


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
    seconds_until_healthy(stack, 180)


def test_the_server_is_healthy_again_within_30s_after_kill_9(stack):
    seconds_until_healthy(stack, 180)
    before = unit(stack)
    started = time.monotonic()
    guest(stack, f"sudo kill -9 {before['MainPID']}")
    # The killed server's workers may answer for a moment: wait for the new one.
    while unit(stack)["MainPID"] in {before["MainPID"], "0"}:
        assert time.monotonic() - started < 30, "systemd did not start the server again"
        time.sleep(0.5)
    seconds_until_healthy(stack, 60)
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
    seconds_until_healthy(stack, 180)
    code, checks = status(stack)
    assert code == 0, checks


def test_destroy_removes_the_stack_and_keeps_the_bucket(stack):
    done = invoke(stack, "destroy", "--yes")
    assert "kept" in done.stdout
    code, checks = status(stack)
    assert code != 0
    assert checks["instance"]["outcome"] == "FAILED"
    assert any("mlflow-ops-" in b["Name"] for b in moto_s3(stack).list_buckets()["Buckets"])
