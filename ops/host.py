"""The host side of a deployment: MLflow in a virtualenv, run by systemd.

Every function here takes an Invoke ``Context``. A Fabric ``Connection`` is
one, so the same steps serve ``invoke deploy`` (over SSH to the stack's
instance or ``--host``) and ``fab -H user@host deploy``.

A deploy is plan, then apply: one probe gathers the host's state in a single
round trip (``ops/host_probe.py``), ``plan`` compares it with what the host
should run and lists only the steps that are needed, and ``apply`` runs them.
With nothing changed the plan is empty, nothing restarts, and the deploy
costs one SSH round trip.

On the host::

    /opt/mlflow/venv-<version>-<hash>  one virtualenv per release, never changed once made
    /opt/mlflow/current            symlink to the release the unit runs
    /opt/mlflow/previous           symlink to the one it ran before, kept for a rollback
    /opt/mlflow-ops/tools          uv, which installs the releases
    /etc/mlflow/mlflow.env         the server's environment (0600, root)
    /etc/systemd/system/mlflow.service
    /var/lib/mlflow/mlflow.db      the metadata store (SQLite, WAL mode)
    /opt/mlflow-ops/backup.py      backup and restore (``ops/host_backup.py``)
    /etc/systemd/system/mlflow-backup.{service,timer}   the scheduled backup
    /etc/mlflow/tls/server.{crt,key}                    the certificate nginx serves
    /etc/nginx/sites-available/mlflow  nginx: TLS on https_port, proxied to MLflow on loopback

A release with a certificate puts nginx in front: MLflow listens on
127.0.0.1 only, and a change to nginx's files reloads nginx without
restarting MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

from invoke import Context
from invoke.exceptions import UnexpectedExit

from ops.config import BACKUP_PREFIX
from ops.console import note, show_command
from ops.errors import OpsError
from ops.logins import ADMIN_USER, ServerSecrets
from ops.templating import render

SERVICE = "mlflow"
SERVICE_USER = "mlflow"
UNIT_PATH = "/etc/systemd/system/mlflow.service"
CONFIG_DIR = "/etc/mlflow"
ENV_PATH = f"{CONFIG_DIR}/mlflow.env"
AUTH_CONFIG_PATH = f"{CONFIG_DIR}/basic_auth.ini"
CA_PATH = f"{CONFIG_DIR}/ca-bundle.pem"
DATA_DIR = "/var/lib/mlflow"
DB_PATH = f"{DATA_DIR}/mlflow.db"
AUTH_DB_PATH = f"{DATA_DIR}/basic_auth.db"
AUTH_CACHE_SECONDS = 30
BACKEND_URI = f"sqlite:///{DB_PATH}"
SCHEMA_MARKER = f"{DATA_DIR}/.mlflow-ops-schema"
RELEASES_DIR = "/opt/mlflow"
CURRENT = f"{RELEASES_DIR}/current"
PREVIOUS = f"{RELEASES_DIR}/previous"
RELEASE_MARKER = ".mlflow-ops-release"
TOOLS_DIR = "/opt/mlflow-ops/tools"
UV = f"{TOOLS_DIR}/bin/uv"
UV_VERSION = "0.13.9"
UV_CACHE = "/var/cache/mlflow-ops/uv"
# Installed with its bytecode compiled: the server's user cannot write the
# release, so without it every start would compile MLflow's modules again.
INSTALL_OPTIONS = ("--compile-bytecode",)
# MLflow's job runner (LLM judges, online scoring, trace archival) starts
# eight more Python processes, about 1.3 GiB, more than a small instance has.
JOBS_VARIABLE = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
PACKAGES = ("python3-venv",)
PROXY_PACKAGES = ("nginx",)
PROXY = "nginx"
TLS_DIR = f"{CONFIG_DIR}/tls"
TLS_CERT_PATH = f"{TLS_DIR}/server.crt"
TLS_KEY_PATH = f"{TLS_DIR}/server.key"
SITE_PATH = "/etc/nginx/sites-available/mlflow"
SITE_LINK = "/etc/nginx/sites-enabled/mlflow"
DEFAULT_SITE_LINK = "/etc/nginx/sites-enabled/default"
PROXY_FILES = {TLS_CERT_PATH, TLS_KEY_PATH, SITE_PATH}
# How long nginx waits on a quiet transfer: a large artifact may take a while
# to reach S3 before MLflow answers.
PROXY_TIMEOUT = "3600s"
PROBE = Path(__file__).with_name("host_probe.py")
BACKUP_SCRIPT_SOURCE = Path(__file__).with_name("host_backup.py")
BACKUP_SCRIPT = "/opt/mlflow-ops/backup.py"
BACKUP_SERVICE = "mlflow-backup"
BACKUP_UNIT_PATH = f"/etc/systemd/system/{BACKUP_SERVICE}.service"
BACKUP_TIMER_PATH = f"/etc/systemd/system/{BACKUP_SERVICE}.timer"
BACKUP_FILES = {BACKUP_SCRIPT, BACKUP_UNIT_PATH, BACKUP_TIMER_PATH}
UNIT_FILES = {UNIT_PATH, BACKUP_UNIT_PATH, BACKUP_TIMER_PATH}
# Where backups go when the artifacts are not in S3: on the host's own volume.
LOCAL_BACKUPS = f"{DATA_DIR}/backups"


@dataclasses.dataclass(frozen=True)
class Release:
    """What the host should run: everything a deploy derives its files from."""

    stack: str
    mlflow_version: str
    port: int
    workers: int
    allowed_hosts: tuple[str, ...]
    artifacts_destination: str
    server_env: dict[str, str]
    ca_bundle: str | None = None
    bind: str = "0.0.0.0"
    jobs: bool = False
    backup_keep: int = 14
    backup_schedule: str = "daily"
    # With secrets, the server requires a login (MLflow's basic auth).
    secrets: ServerSecrets | None = None
    # With a certificate (PEM text), nginx serves MLflow over TLS on https_port.
    tls_cert: str | None = None
    tls_key: str | None = dataclasses.field(default=None, repr=False)
    https_port: int = 443

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def packages(self) -> tuple[str, ...]:
        return PACKAGES + PROXY_PACKAGES if self.tls else PACKAGES

    @property
    def auth(self) -> bool:
        return self.secrets is not None

    @property
    def requirements(self) -> tuple[str, ...]:
        # boto3 lets the server proxy artifacts to S3; MLflow does not
        # depend on it by itself.
        mlflow = "mlflow[auth]" if self.auth else "mlflow"
        return (f"{mlflow}=={self.mlflow_version}", "boto3")

    @property
    def install_record(self) -> str:
        """What the release's marker holds: when it differs, the release is installed again."""
        return " ".join([*INSTALL_OPTIONS, *self.requirements])

    @property
    def release_name(self) -> str:
        # Named after what is installed in it, so a release is never changed
        # in place: new options or packages make a new one beside the running one.
        digest = hashlib.sha256(self.install_record.encode()).hexdigest()[:8]
        return f"venv-{self.mlflow_version}-{digest}"

    @property
    def release_dir(self) -> str:
        return f"{RELEASES_DIR}/{self.release_name}"

    @property
    def backup_destination(self) -> str:
        return backup_destination(self.artifacts_destination)


def backup_destination(artifacts_destination: str) -> str:
    """Backups go to the artifacts' bucket under ``backups/``, else beside the database."""
    if artifacts_destination.startswith("s3://"):
        bucket = artifacts_destination[len("s3://") :].split("/", 1)[0]
        return f"s3://{bucket}/{BACKUP_PREFIX}"
    return LOCAL_BACKUPS


def backup_command(destination: str, *args: str) -> list[str]:
    """The host script's command line, as the backup unit and the tasks run it."""
    python = f"{CURRENT}/bin/python"
    return [python, BACKUP_SCRIPT, *args, "--data-dir", DATA_DIR, "--destination", destination]


def backup_properties() -> list[tuple[str, str]]:
    """How the backup runs: as the server's user, in its environment, reaching S3 as it does."""
    return [
        ("User", SERVICE_USER),
        ("Group", SERVICE_USER),
        ("WorkingDirectory", DATA_DIR),
        ("EnvironmentFile", ENV_PATH),
        ("Nice", "10"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("ReadWritePaths", DATA_DIR),
    ]


@dataclasses.dataclass(frozen=True)
class ManagedFile:
    path: str
    content: str
    mode: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Step:
    """One change to the host; ``restart`` marks changes the server must reload."""

    title: str
    action: Callable[[Context], None]
    restart: bool = False


def server_command(release: Release) -> list[str]:
    """The server's command line, as the unit runs it."""
    return [
        f"{CURRENT}/bin/mlflow",
        "server",
        "--backend-store-uri",
        BACKEND_URI,
        # Artifacts go through the server (clients need no cloud
        # credentials); no --default-artifact-root, which would send
        # clients straight to the bucket.
        "--serve-artifacts",
        "--artifacts-destination",
        release.artifacts_destination,
        "--host",
        release.bind,
        "--port",
        str(release.port),
        "--workers",
        str(release.workers),
        "--allowed-hosts",
        ",".join(release.allowed_hosts),
        *(["--app-name", "basic-auth"] if release.auth else []),
    ]


def managed_files(release: Release) -> list[ManagedFile]:
    """Render every file the host gets, on this side, before connecting."""
    environment = {JOBS_VARIABLE: "true" if release.jobs else "false", **release.server_env}
    if release.ca_bundle is not None:
        environment.setdefault("AWS_CA_BUNDLE", CA_PATH)
    if release.secrets is not None:
        environment.update(
            MLFLOW_AUTH_CONFIG_PATH=AUTH_CONFIG_PATH,
            MLFLOW_AUTH_ADMIN_PASSWORD=release.secrets.admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY=release.secrets.secret_key,
        )
    files = [
        ManagedFile(
            UNIT_PATH,
            render(
                "mlflow.service.j2",
                stack=release.stack,
                user=SERVICE_USER,
                data_dir=DATA_DIR,
                env_path=ENV_PATH,
                exec_start=server_command(release),
            ),
            "0644",
        ),
        ManagedFile(
            ENV_PATH,
            render(
                "mlflow.env.j2",
                stack=release.stack,
                data_dir=DATA_DIR,
                environment=environment,
            ),
            "0600",
        ),
    ]
    if release.ca_bundle is not None:
        files.append(ManagedFile(CA_PATH, release.ca_bundle, "0644"))
    files += _backup_files(release)
    if release.tls:
        files += _proxy_files(release)
    if release.auth:
        auth_config = render(
            "basic_auth.ini.j2",
            stack=release.stack,
            database=AUTH_DB_PATH,
            admin=ADMIN_USER,
            cache_seconds=AUTH_CACHE_SECONDS,
        )
        files.append(ManagedFile(AUTH_CONFIG_PATH, auth_config, "0644"))
    return files


def _backup_files(release: Release) -> list[ManagedFile]:
    keep = ["--keep", str(release.backup_keep)]
    command = backup_command(release.backup_destination, "backup", *keep)
    context = {"stack": release.stack, "service": BACKUP_SERVICE}
    return [
        ManagedFile(BACKUP_SCRIPT, BACKUP_SCRIPT_SOURCE.read_text(), "0644"),
        ManagedFile(
            BACKUP_UNIT_PATH,
            render(
                "mlflow-backup.service.j2",
                **context,
                properties=backup_properties(),
                exec_start=command,
            ),
            "0644",
        ),
        ManagedFile(
            BACKUP_TIMER_PATH,
            render("mlflow-backup.timer.j2", **context, schedule=release.backup_schedule),
            "0644",
        ),
    ]


def _proxy_files(release: Release) -> list[ManagedFile]:
    site = render(
        "nginx-mlflow.conf.j2",
        stack=release.stack,
        https_port=release.https_port,
        port=release.port,
        cert_path=TLS_CERT_PATH,
        key_path=TLS_KEY_PATH,
        timeout=PROXY_TIMEOUT,
    )
    return [
        ManagedFile(TLS_CERT_PATH, release.tls_cert, "0644"),
        ManagedFile(TLS_KEY_PATH, release.tls_key, "0600"),
        ManagedFile(SITE_PATH, site, "0644"),
    ]


class _Input(io.StringIO):
    """Text for a remote command's standard input.

    Invoke reads a stream that is not a terminal one byte per 10 ms, which
    makes a 3 KB script take 30 s; handing it large chunks avoids that.
    """

    def read(self, size: int | None = -1) -> str:
        return super().read(65536)


def sudo(c: Context, argv: Sequence[str], *, echo: bool = False, **kwargs) -> str:
    """Run a command as root; ``sudo -n`` fails at once rather than prompt."""
    command = shlex.join(["sudo", "-n", "--", *argv])
    if echo:
        show_command(shlex.join(argv))
    try:
        return c.run(command, hide=True, in_stream=kwargs.pop("in_stream", False), **kwargs).stdout
    except UnexpectedExit as exc:
        detail = (exc.result.stderr or exc.result.stdout).strip().splitlines()[-5:]
        raise OpsError(
            f"command failed on the host: {shlex.join(argv)}\n    " + "\n    ".join(detail),
            hint="the user needs passwordless sudo" if "password" in str(detail) else None,
        ) from None


def probe(c: Context, release: Release | None = None) -> dict:
    """Collect the host's state in one round trip (see ``host_probe``)."""
    files = [f.path for f in managed_files(release)] if release else [UNIT_PATH, ENV_PATH]
    request = {
        "packages": list(release.packages if release else PACKAGES),
        "user": SERVICE_USER,
        "files": files,
        "releases": RELEASES_DIR,
        "marker": RELEASE_MARKER,
        "current": CURRENT,
        "uv": UV,
        "schema_marker": SCHEMA_MARKER,
        "unit": SERVICE,
        "data_dir": DATA_DIR,
        "proxy": PROXY,
        "links": [SITE_LINK, DEFAULT_SITE_LINK, PREVIOUS],
    }
    script = _Input(PROBE.read_text())
    output = sudo(c, ["python3", "-", json.dumps(request)], in_stream=script)
    return json.loads(output)


def plan(release: Release, facts: dict) -> list[Step]:
    """List the steps that bring the host from ``facts`` to ``release``."""
    steps: list[Step] = []
    missing = [name for name, ok in facts["packages"].items() if not ok]
    if missing:
        steps.append(Step(f"install {', '.join(missing)}", _install_packages(missing)))
    if not facts["user"]:
        steps.append(Step(f"create system user {SERVICE_USER}", _create_user))
    # Files first: the CA bundle may be needed to download anything.
    changed = [f for f in managed_files(release) if facts["files"].get(f.path) != f.sha256]
    for managed in changed:
        # The backup's and nginx's files are not the server's: writing them
        # restarts nothing.
        server_file = managed.path not in BACKUP_FILES | PROXY_FILES
        steps.append(Step(f"write {managed.path}", _write_file(managed), restart=server_file))
    if any(f.path in UNIT_FILES for f in changed):
        steps.append(Step("reload systemd", _daemon_reload))

    if facts["uv"] != UV_VERSION:
        steps.append(Step(f"install uv {UV_VERSION}", _install_uv(release)))
    if facts["releases"].get(release.release_name) != release.install_record:
        spec = " ".join(release.requirements)
        steps.append(Step(f"install {spec}", _install_release(release), restart=True))

    if facts["schema"] != release.mlflow_version:
        steps.append(Step(f"migrate {DB_PATH}", _migrate(release), restart=True))
    if facts["current"] != release.release_name:
        switch = _switch(release, facts["current"])
        steps.append(Step(f"switch to {release.release_name}", switch, restart=True))

    unit = facts["unit"]
    if unit.get("UnitFileState") != "enabled":
        steps.append(Step(f"enable {SERVICE}", _enable))
    if any(step.restart for step in steps):
        steps.append(Step(f"restart {SERVICE}", _restart))
    elif unit.get("ActiveState") != "active":
        steps.append(Step(f"start {SERVICE}", _start))
    # A new or changed timer is (re)started; a host's first one also takes a
    # first backup, so a fresh stack has one from the start.
    timer_written = any(f.path in {BACKUP_UNIT_PATH, BACKUP_TIMER_PATH} for f in changed)
    if timer_written:
        steps.append(Step(f"enable {BACKUP_SERVICE}.timer", _enable_backup_timer))
    if facts["files"].get(BACKUP_TIMER_PATH) is None:
        steps.append(Step("take a first backup", _first_backup))

    if release.tls:
        steps += _proxy_steps(facts, proxy_changed=any(f.path in PROXY_FILES for f in changed))

    # Keep the running release and the one before it, for a quick rollback.
    keep = {release.release_name, facts["current"], facts.get("links", {}).get(PREVIOUS)}
    stale = [name for name in facts["releases"] if name not in keep]
    if stale:
        steps.append(Step(f"remove old releases {', '.join(stale)}", _remove_releases(stale)))
    return steps


def _proxy_steps(facts: dict, *, proxy_changed: bool) -> list[Step]:
    """Enable the site alone, then reload nginx, which keeps open connections, or start it."""
    steps = []
    links = facts.get("links", {})
    site_off = links.get(SITE_LINK) != SITE_PATH or links.get(DEFAULT_SITE_LINK) is not None
    if site_off:
        steps.append(Step("enable the mlflow site in nginx", _enable_site))
    proxy = facts.get("proxy", {})
    if proxy.get("UnitFileState") != "enabled":
        steps.append(Step(f"enable {PROXY}", _enable_proxy))
    if proxy.get("ActiveState") != "active":
        steps.append(Step(f"start {PROXY}", _start_proxy))
    elif proxy_changed or site_off:
        steps.append(Step(f"reload {PROXY}", _reload_proxy))
    return steps


def apply(c: Context, steps: Sequence[Step]) -> None:
    for step in steps:
        note(step.title)
        step.action(c)


# The steps. Each returns or is an action taking the Context.


def _install_packages(names: list[str]) -> Callable[[Context], None]:
    def action(c: Context) -> None:
        apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q"]
        sudo(c, [*apt, "update"], echo=True)
        sudo(c, [*apt, "install", "-y", *names], echo=True)

    return action


def _create_user(c: Context) -> None:
    argv = ["useradd", "--system", "--user-group", "--home-dir", DATA_DIR]
    sudo(c, [*argv, "--shell", "/usr/sbin/nologin", SERVICE_USER], echo=True)
    sudo(c, ["install", "-d", "-o", SERVICE_USER, "-g", SERVICE_USER, "-m", "0750", DATA_DIR])


def _proxy_env(release: Release) -> list[str]:
    """Environment that lets pip and uv trust the shipped CA bundle."""
    if release.ca_bundle is None:
        return []
    return [f"SSL_CERT_FILE={CA_PATH}", f"PIP_CERT={CA_PATH}", "UV_NATIVE_TLS=1"]


def _install_uv(release: Release) -> Callable[[Context], None]:
    def action(c: Context) -> None:
        sudo(c, ["python3", "-m", "venv", "--clear", TOOLS_DIR], echo=True)
        pip = [f"{TOOLS_DIR}/bin/pip", "install", "--quiet", f"uv=={UV_VERSION}"]
        sudo(c, ["env", *_proxy_env(release), *pip], echo=True)

    return action


def _install_release(release: Release) -> Callable[[Context], None]:
    # A release counts as installed only once its marker is written, so an
    # install cut short is redone from scratch by the next deploy.
    def action(c: Context) -> None:
        env = ["env", f"UV_CACHE_DIR={UV_CACHE}", "UV_LINK_MODE=copy", *_proxy_env(release)]
        python = f"{release.release_dir}/bin/python"
        sudo(c, ["mkdir", "-p", UV_CACHE])
        sudo(c, [*env, UV, "venv", "--quiet", "--clear", "--python", "/usr/bin/python3",
                 release.release_dir], echo=True)  # fmt: skip
        sudo(c, [*env, UV, "pip", "install", "--quiet", *INSTALL_OPTIONS, "--python", python,
                 *release.requirements], echo=True)  # fmt: skip
        marker = f"{release.release_dir}/{RELEASE_MARKER}"
        sudo(c, ["tee", marker], in_stream=_Input(release.install_record + "\n"))

    return action


def _write_file(managed: ManagedFile) -> Callable[[Context], None]:
    # The content travels on standard input, never on a command line that
    # `ps` would show, and `install` sets mode and owner before it lands.
    def action(c: Context) -> None:
        directory = str(Path(managed.path).parent)
        sudo(c, ["install", "-d", "-m", "0755", directory])
        argv = ["install", "-m", managed.mode, "-o", "root", "-g", "root", "/dev/stdin"]
        sudo(c, [*argv, managed.path], in_stream=_Input(managed.content))

    return action


def _daemon_reload(c: Context) -> None:
    sudo(c, ["systemctl", "daemon-reload"])


def _migrate(release: Release) -> Callable[[Context], None]:
    # Migrate once, with the server stopped, before the new release starts:
    # several workers racing through a migration lock each other out.
    def action(c: Context) -> None:
        sudo(c, ["systemctl", "stop", SERVICE], echo=True)
        as_mlflow = ["sudo", "-n", "-u", SERVICE_USER, "--", "env", "-C", DATA_DIR]
        mlflow = f"{release.release_dir}/bin/mlflow"
        sudo(c, [*as_mlflow, mlflow, "db", "upgrade", BACKEND_URI], echo=True)
        # WAL lets readers and the writer work at once: measured here at
        # about 1.5 times the throughput of the default rollback journal.
        wal = "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA journal_mode=WAL')"
        sudo(c, [*as_mlflow, "python3", "-c", wal, DB_PATH])
        sudo(c, ["tee", SCHEMA_MARKER], in_stream=_Input(release.mlflow_version + "\n"))

    return action


def _switch(release: Release, running: str | None) -> Callable[[Context], None]:
    def action(c: Context) -> None:
        # New links renamed over the old ones, so neither is ever missing.
        # `previous` names the release to roll back to, and keeps it.
        links = {CURRENT: release.release_name}
        if running is not None:
            links = {PREVIOUS: running, **links}
        for link, name in links.items():
            sudo(c, ["ln", "-sfn", name, f"{link}.new"])
            sudo(c, ["mv", "-T", f"{link}.new", link])

    return action


def _enable(c: Context) -> None:
    sudo(c, ["systemctl", "enable", "--quiet", SERVICE], echo=True)


def _restart(c: Context) -> None:
    sudo(c, ["systemctl", "restart", SERVICE], echo=True)


def _start(c: Context) -> None:
    sudo(c, ["systemctl", "start", SERVICE], echo=True)


def _enable_backup_timer(c: Context) -> None:
    timer = f"{BACKUP_SERVICE}.timer"
    sudo(c, ["systemctl", "enable", "--quiet", timer], echo=True)
    sudo(c, ["systemctl", "restart", timer])


def _first_backup(c: Context) -> None:
    sudo(c, ["systemctl", "start", f"{BACKUP_SERVICE}.service"], echo=True)


def _remove_releases(names: list[str]) -> Callable[[Context], None]:
    def action(c: Context) -> None:
        sudo(c, ["rm", "-rf", *(f"{RELEASES_DIR}/{name}" for name in names)], echo=True)

    return action


def _enable_site(c: Context) -> None:
    sudo(c, ["ln", "-sfn", SITE_PATH, SITE_LINK], echo=True)
    sudo(c, ["rm", "-f", DEFAULT_SITE_LINK], echo=True)


def _enable_proxy(c: Context) -> None:
    sudo(c, ["systemctl", "enable", "--quiet", PROXY], echo=True)


def _start_proxy(c: Context) -> None:
    # Installing the package may have started nginx since the probe: a
    # reload makes sure it reads the new site either way.
    sudo(c, ["nginx", "-t", "-q"], echo=True)
    sudo(c, ["systemctl", "reload-or-restart", PROXY], echo=True)


def _reload_proxy(c: Context) -> None:
    # A configuration nginx refuses fails here, and the running one stays.
    sudo(c, ["nginx", "-t", "-q"], echo=True)
    sudo(c, ["systemctl", "reload", PROXY], echo=True)
