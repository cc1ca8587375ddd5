"""Health of a stack, end to end, as its users depend on it.

``/health`` alone proves little: it answers without touching the database or
the bucket. So ``status`` also reads the metadata store through the API and
sends an artifact through the server to the bucket and back.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import ssl
import time
import uuid

import requests
import tenacity
from cryptography import x509
from rich.table import Table

from ops import backup as backups
from ops import host, logins, tls
from ops.aws import Aws
from ops.config import ARTIFACT_PREFIX, Settings
from ops.console import console
from ops.errors import OpsError
from ops.provision import describe
from ops.target import Connector, Target, connect, locate, uses_aws

HTTP_TIMEOUT = 30
# Less free space than this where the database lives fails the disk check.
MIN_FREE_BYTES = 1 << 30
MIN_FREE_FRACTION = 0.10
HEALTH_PREFIX = "mlflow-ops-health"
# The worst `systemd-analyze security` exposure the server's unit may have.
MAX_EXPOSURE = 2.0
# Every check, in the order status runs them.
CHECKS = (
    "instance",
    "ssh",
    "unit",
    "exposure",
    "disk",
    "certificate",
    "health",
    "version",
    "login",
    "metadata",
    "artifacts",
    "backup",
)


@dataclasses.dataclass
class Check:
    """One line of the status table. ``passed`` is None when it could not run."""

    name: str
    passed: bool | None
    detail: str
    hint: str | None = None

    @property
    def outcome(self) -> str:
        return {True: "ok", False: "FAILED", None: "skipped"}[self.passed]

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "outcome": self.outcome}


def show(checks: list[Check]) -> None:
    """Print the checks as a table, then the hint of each one that failed."""
    table = Table(title="status", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    colour = {True: "green", False: "red", None: "yellow"}
    for check in checks:
        table.add_row(check.name, f"[{colour[check.passed]}]{check.outcome}[/]", check.detail)
    console.print(table)
    for check in checks:
        if check.passed is False and check.hint:
            console.print(f"[red]{check.name}[/red]: {check.hint}", soft_wrap=True)


def _fail(name: str, error: Exception, hint: str | None = None) -> Check:
    if isinstance(error, OpsError):
        return Check(name, False, error.message, error.hint or hint)
    return Check(name, False, f"{type(error).__name__}: {error}", hint)


def status(
    settings: Settings,
    *,
    connector: Connector = connect,
) -> list[Check]:
    """Run every check; a check whose prerequisite failed is marked skipped."""
    checks: list[Check] = []
    aws = None
    if uses_aws(settings):
        try:
            aws = Aws.connect(settings)
            checks.append(_instance_check(describe(settings, aws)))
        except OpsError as exc:
            checks.append(_fail("instance", exc))

    try:
        target = locate(settings, aws)
    except OpsError as exc:
        names = CHECKS[1:]
        return [*checks, *(Check(name, None, exc.message, exc.hint) for name in names)]

    checks.extend(_host_checks(settings, target, connector))
    verify = tls.verify_for(settings, aws)
    checks.append(_certificate_check(settings, target, aws))
    checks.extend(_server_checks(settings, target, aws, verify))
    checks.append(_backup_check(settings, target, aws, connector))
    return checks


def _instance_check(state) -> Check:
    if state.instance_state == "running":
        return Check("instance", True, f"{state.instance_id} running at {state.public_address}")
    found = f"{state.instance_id} is {state.instance_state}" if state.instance_id else "none"
    return Check("instance", False, found, hint="run `invoke provision`")


def _host_checks(settings: Settings, target: Target, connector) -> list[Check]:
    try:
        with connector(settings, target) as c:
            facts = host.probe(c)
            report = host.sudo(c, ["systemd-analyze", "security", host.SERVICE, "--no-pager"],
                               warn=True)  # fmt: skip
    except Exception as exc:  # any failure to reach the host is this check's finding
        login = f"ssh -p {target.ssh_port} {target.ssh_user}@{target.ssh_host}"
        return [
            _fail("ssh", exc, hint=f"is SSH open to you? try `{login}`"),
            Check("unit", None, "needs SSH"),
            Check("exposure", None, "needs SSH"),
            Check("disk", None, "needs SSH"),
        ]
    checks = [Check("ssh", True, target.ssh)]

    unit = facts["unit"]
    restarts = unit.get("NRestarts", "?")
    state = f"{unit.get('ActiveState', '?')} ({unit.get('SubState', '?')}), {restarts} restarts"
    if unit.get("ActiveState") == "active":
        checks.append(Check("unit", True, state))
    else:
        checks.append(
            Check(
                "unit",
                False,
                state,
                hint=f"see `sudo journalctl -u {host.SERVICE}` on the host, or run `invoke deploy`",
            )
        )

    checks.append(exposure_check(report))

    disk = facts["disk"]
    free, total = disk["free"], disk["total"]
    detail = f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB on {disk['path']}"
    if free < MIN_FREE_BYTES or free < total * MIN_FREE_FRACTION:
        checks.append(
            Check("disk", False, detail, hint="free space or grow the volume before MLflow stops")
        )
    else:
        checks.append(Check("disk", True, detail))
    return checks


_EXPOSURE = re.compile(r"Overall exposure level for \S+: ([0-9.]+)")


def exposure_check(report: str) -> Check:
    """Judge the unit by the last line of ``systemd-analyze security``."""
    found = _EXPOSURE.search(report)
    if found is None:
        hint = f"run `sudo systemd-analyze security {host.SERVICE}` on the host"
        return Check("exposure", False, "systemd-analyze security gave no exposure level", hint)
    level = float(found.group(1))
    detail = f"{level:.1f} (limit {MAX_EXPOSURE:.1f}) by systemd-analyze security"
    if level > MAX_EXPOSURE:
        return Check("exposure", False, detail, hint="run `invoke deploy` to restore the unit")
    return Check("exposure", True, detail)


def presented_certificate(
    address: str, port: int, timeout: float = HTTP_TIMEOUT
) -> x509.Certificate:
    """The certificate a TLS server presents, read without trusting it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((address, port), timeout=timeout) as sock,
        context.wrap_socket(sock, server_hostname=address) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def _certificate_check(settings: Settings, target: Target, aws: Aws | None) -> Check:
    """The server presents the stack's certificate, valid for more than two weeks."""
    try:
        served = presented_certificate(target.address, target.https_port)
    except (OSError, ValueError) as exc:
        return _fail("certificate", exc, hint=f"is port {target.https_port} open to you? "
                     "is nginx running on the host?")  # fmt: skip
    expected = None
    if settings.tls_cert is not None and settings.tls_cert.is_file():
        expected = x509.load_pem_x509_certificate(settings.tls_cert.read_bytes())
    elif aws is not None and (stored := tls.stored(settings, aws)) is not None:
        expected = stored.leaf
    left = tls.days_left(served)
    detail = f"{tls.fingerprint(served)[:23]}..., {left:.0f} days left"
    if expected is not None and tls.fingerprint(expected) != tls.fingerprint(served):
        return Check("certificate", False, f"the server presents another certificate: {detail}",
                     hint="run `invoke deploy` to install the stack's certificate")  # fmt: skip
    if left <= tls.MIN_DAYS_LEFT:
        return Check("certificate", False, detail, hint="renew it (tls_cert, tls_key) and run "
                     "`invoke deploy`")  # fmt: skip
    return Check("certificate", True, detail)


def _server_checks(
    settings: Settings, target: Target, aws: Aws | None, verify: bool | str = True
) -> list[Check]:
    session = tls.Session()
    session.verify = verify
    url = target.url
    secrets = logins.read(settings, aws) if settings.auth and aws is not None else None
    if secrets is not None:
        session.auth = (logins.ADMIN_USER, secrets.admin_password)
    try:
        answer = session.get(f"{url}/health", timeout=HTTP_TIMEOUT)
        if answer.status_code != 200 or answer.text.strip() != "OK":
            raise OpsError(f"/health answered {answer.status_code}: {answer.text[:80]!r}")
    except (requests.RequestException, OpsError) as exc:
        hint = f"is port {target.https_port} open to you? are the unit and nginx running?"
        names = ["version", "login", "metadata", "artifacts"]
        return [_fail("health", exc, hint), *(Check(n, None, "needs /health") for n in names)]
    checks = [Check("health", True, f"{url}/health answered OK")]

    version = session.get(f"{url}/version", timeout=HTTP_TIMEOUT).text.strip()
    if version == settings.mlflow_version:
        checks.append(Check("version", True, version))
    else:
        checks.append(
            Check(
                "version",
                False,
                f"server runs {version}, configured {settings.mlflow_version}",
                hint="run `invoke deploy` to install the configured version",
            )
        )

    checks.append(_login_check(settings, url, secrets, verify))
    checks.append(_metadata_check(session, url))
    checks.append(_artifact_check(session, target, aws))
    return checks


def _login_check(
    settings: Settings, url: str, secrets: logins.ServerSecrets | None, verify: bool | str = True
) -> Check:
    """Without a login the API must refuse; so must MLflow's old default password."""
    if not settings.auth:
        # Chosen, not broken: shown, but not a failure.
        return Check("login", True, "off (auth: false): anyone who reaches the port may write")
    if secrets is None:
        return Check("login", False, "the stack has no admin password in SSM",
                     hint="run `invoke deploy`")  # fmt: skip
    probe = f"{url}/api/2.0/mlflow/experiments/search"
    body = {"max_results": 1}
    anonymous = requests.post(probe, json=body, timeout=HTTP_TIMEOUT, verify=verify)
    legacy = requests.post(
        probe,
        json=body,
        auth=(logins.ADMIN_USER, logins.LEGACY_ADMIN_PASSWORD),
        timeout=HTTP_TIMEOUT,
        verify=verify,
    )
    if anonymous.status_code != 401:
        return Check("login", False, f"a request without a login got {anonymous.status_code}",
                     hint="run `invoke deploy` to turn logins on")  # fmt: skip
    if legacy.status_code != 401:
        return Check("login", False, "MLflow's old default admin password is accepted",
                     hint="run `invoke deploy`, which replaces it")  # fmt: skip
    return Check("login", True, "requests without a login and the old default password get 401")


def _metadata_check(session: requests.Session, url: str) -> Check:
    try:
        answer = session.post(
            f"{url}/api/2.0/mlflow/experiments/search",
            json={"max_results": 1},
            timeout=HTTP_TIMEOUT,
        )
        answer.raise_for_status()
        answer.json()
    except (requests.RequestException, ValueError) as exc:
        return _fail("metadata", exc, hint=f"see `sudo journalctl -u {host.SERVICE}` on the host")
    return Check("metadata", True, "searched experiments in the metadata store")


def _artifact_check(session: requests.Session, target: Target, aws: Aws | None) -> Check:
    """Upload a small artifact through the server, find it in S3, read it back, delete it."""
    path = f"{HEALTH_PREFIX}/{uuid.uuid4().hex}.txt"
    payload = f"mlflow-ops status check {time.time()}\n".encode()
    endpoint = f"{target.url}/api/2.0/mlflow-artifacts/artifacts/{path}"
    try:
        session.put(endpoint, data=payload, timeout=HTTP_TIMEOUT).raise_for_status()
        try:
            back = session.get(endpoint, timeout=HTTP_TIMEOUT)
            back.raise_for_status()
            if back.content != payload:
                raise OpsError("the artifact read back differs from the one written")
            where = target.artifacts_destination
            if target.bucket and aws is not None:
                key = f"{ARTIFACT_PREFIX}/{path}"
                if aws.head_object(target.bucket, key) is None:
                    raise OpsError(f"the artifact did not reach s3://{target.bucket}/{key}")
        finally:
            session.delete(endpoint, timeout=HTTP_TIMEOUT)
    except (requests.RequestException, OpsError) as exc:
        return _fail(
            "artifacts",
            exc,
            hint="check the instance role's access to the bucket and the server's log",
        )
    return Check("artifacts", True, f"round trip through the server to {where}")


def _backup_check(settings: Settings, target: Target, aws: Aws | None, connector) -> Check:
    """The newest verified backup must be younger than ``backup_max_age_hours``.

    A first deploy takes a backup, so a stack without any has lost its
    backups or never finished a deploy.
    """
    try:
        newest = backups.newest_good(
            backups.stored(settings, target=target, aws=aws, connector=connector)
        )
    except Exception as exc:  # an unreadable store is this check's finding
        return _fail("backup", exc, hint="check access to the bucket's backups/ prefix")
    limit = settings.backup_max_age_hours
    if newest is None:
        return Check("backup", False, "no verified backup", hint="run `invoke backup`")
    age = newest.age_hours(time.time()) or 0.0
    detail = f"newest {newest.id}, {age:.1f} h old (limit {limit} h)"
    if age > limit:
        hint = f"see `sudo journalctl -u {host.BACKUP_SERVICE}` on the host; run `invoke backup`"
        return Check("backup", False, detail, hint=hint)
    return Check("backup", True, detail)


def wait_until_ready(
    url: str,
    version: str,
    *,
    login: tuple[str, str] | None = None,
    verify: bool | str = True,
    timeout: float = 180,
) -> None:
    """Wait until the server at ``url`` answers ``/health`` and runs ``version``."""

    def ready() -> None:
        answer = requests.get(f"{url}/health", timeout=HTTP_TIMEOUT, verify=verify)
        if answer.status_code != 200:
            raise OpsError(f"/health answered {answer.status_code}")
        running = requests.get(f"{url}/version", auth=login, timeout=HTTP_TIMEOUT, verify=verify)
        if running.status_code == 401:
            raise OpsError("/version refused the admin login")
        if running.text.strip() != version:
            raise OpsError(f"the server runs {running.text.strip()}, not {version}")

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_fixed(1),
        retry=tenacity.retry_if_exception_type((requests.RequestException, OpsError)),
        reraise=True,
    )
    try:
        retrying(ready)
    except (requests.RequestException, OpsError) as exc:
        raise OpsError(
            f"{url} did not become ready within {timeout:.0f}s: {exc}",
            hint=f"see `sudo journalctl -u {host.SERVICE}` on the host",
        ) from None
