"""The local sandbox: AWS from moto, and a real Debian 12 host booted with systemd-nspawn.

``up`` starts two things on this machine and records them in a state directory:

- a moto server on a loopback port, which boto3 reaches through the standard
  ``AWS_ENDPOINT_URL``, with a Debian image registered in it;
- a guest: Debian 12 with systemd as PID 1 and sshd, booted by systemd-nspawn
  from a root filesystem that debootstrap builds once and a cache keeps. A
  small supervisor process starts the guest again after a ``reboot`` inside it.

``env_exports`` gives the environment that points the toolkit at both. The
toolkit itself has no sandbox code path: the sandbox only supplies endpoints,
settings and a host. ``down`` stops what ``up`` started, by the process ids it
recorded, and removes the state directory but not the cache.

The state directory holds ``sandbox.json``, the SSH key pair, the logs of moto
and of the guest, and the guest's own copy of the root filesystem. The cache,
under ``$XDG_CACHE_HOME/mlflow-ops``, holds the root filesystem (the first
``up`` fetches it from deb.debian.org, which takes about a minute) and the
wheels that deploys in any sandbox download.

Known shortcomings:

- Ports are found free by binding to port 0, then released before moto, sshd
  or MLflow bind them; another program can take one in between.
- The guest shares the machine's network, so whatever it listens on is on the
  machine's loopback too, and its sshd and MLflow ports must stay free.
- The cached root filesystem is never updated. Remove the cache directory (see
  ``rootfs_dir``) to get a fresh one with the latest Debian packages.
- moto keeps its state in memory. When it has died, ``up`` starts it again and
  registers a new image, but resources provisioned before are gone, and a
  server deployed with the old endpoint in its environment must be deployed
  again if the port changed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import boto3
import botocore.session
import tenacity

from ops import hostkeys
from ops.config import user_dir
from ops.console import export_lines, note, phase
from ops.errors import OpsError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO / ".sandbox"
STATE_FILE = "sandbox.json"
STACK = "sandbox"

# What debootstrap installs. These and CUSTOMISATION_VERSION make the cache key:
# bump the version whenever ``_customise`` changes, so old caches are not reused.
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd,systemd-sysv,dbus,openssh-server,python3,python3-venv,sudo,"
    "ca-certificates,iproute2,sqlite3"
)
DEBOOTSTRAP_ARGS = ("--variant=minbase", f"--include={PACKAGES}", SUITE)
CUSTOMISATION_VERSION = 1

# Debian's official images log in as `admin` with passwordless sudo; so does the guest.
GUEST_USER = "admin"
# Deploy points UV_CACHE_DIR here; it is bound to a cache on this machine so
# that every sandbox reuses the wheels downloaded once.
GUEST_UV_CACHE = "/var/cache/mlflow-ops/uv"
IMAGE_NAME = "mlflow-ops-sandbox-debian-12"
REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
REQUIRED_COMMANDS = ("systemd-nspawn", "debootstrap", "chroot", "cp", "ssh-keygen", "umount")

# systemd-nspawn exits with this status when the guest runs `reboot`.
REBOOT_STATUS = 133
START_TIMEOUT = 60.0
STOP_TIMEOUT = 90.0
MOTO_STOP_TIMEOUT = 10.0

DEPS_HINT = "run `make sandbox-deps` (apt-get install systemd-container debootstrap)"


@dataclasses.dataclass(frozen=True)
class Process:
    """A process the sandbox started, known by its id and its start time.

    The start time tells it apart from an unrelated process that was given the
    same id after it ended, so the sandbox never signals a stranger.
    """

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Process:
        stat = _proc_stat(pid)
        if stat is None:
            raise OpsError(f"process {pid} ended as soon as it started")
        return cls(pid, int(stat[19]))

    def alive(self) -> bool:
        stat = _proc_stat(self.pid)
        if stat is None or int(stat[19]) != self.started:
            return False
        if stat[0] == "Z":
            # A child of this interpreter that has exited: collect its status.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
            return False
        return True

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to end; say whether it did."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` from the state on, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in parentheses may hold spaces: split after its closing one.
    return text[text.rindex(")") + 2 :].split()


@dataclasses.dataclass
class Sandbox:
    """One sandbox as recorded in its state directory."""

    state_dir: Path
    machine: str
    moto_port: int
    ssh_port: int
    mlflow_port: int
    key_path: Path
    guest_root: Path
    uv_cache: Path
    moto_log: Path
    guest_log: Path
    guest_pid_file: Path
    rootfs: Path | None = None
    # nginx's port in the guest; on the machine's network too, so never 443.
    https_port: int | None = None
    ami_id: str | None = None
    moto: Process | None = None
    supervisor: Process | None = None

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def ssh_target(self) -> str:
        return f"{GUEST_USER}@127.0.0.1:{self.ssh_port}"

    @property
    def mlflow_url(self) -> str:
        """Where clients reach the server: nginx, over TLS."""
        return f"https://127.0.0.1:{self.https_port}"

    def guest_process(self) -> Process | None:
        """The systemd-nspawn process running the guest now, as its supervisor recorded it."""
        try:
            return Process(**json.loads(self.guest_pid_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def processes(self) -> list[Process]:
        """Every process of this sandbox that is running."""
        candidates = [self.moto, self.supervisor, self.guest_process()]
        return [process for process in candidates if process is not None and process.alive()]

    def save(self) -> None:
        """Write the state file, atomically, so a reader never sees half of it."""
        data = dataclasses.asdict(self)
        path = self.state_dir / STATE_FILE
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(partial, path)


_PATH_FIELDS = (
    "state_dir",
    "key_path",
    "guest_root",
    "uv_cache",
    "moto_log",
    "guest_log",
    "guest_pid_file",
    "rootfs",
)


def load(state_dir: Path = DEFAULT_STATE_DIR) -> Sandbox | None:
    """The sandbox recorded in ``state_dir``, or None when there is none."""
    path = Path(state_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise OpsError(
            f"the sandbox state file {path} is unreadable ({exc})",
            hint=f"stop what it started by hand, then remove {state_dir}",
        ) from None
    for name in _PATH_FIELDS:
        if data.get(name) is not None:
            data[name] = Path(data[name])
    for name in ("moto", "supervisor"):
        if data.get(name) is not None:
            data[name] = Process(**data[name])
    return Sandbox(**data)


def env_vars(sandbox: Sandbox) -> dict[str, str]:
    """The environment that points the toolkit, boto3 and MLflow at the sandbox."""
    aws = {"AWS_ENDPOINT_URL": sandbox.moto_url, **CREDENTIALS}
    variables = {
        **aws,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        # Point boto3 away from the developer's own AWS configuration.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        # A stack of its own, so its certificate and secrets never stand in
        # for those of a real stack with the default name.
        "MLFLOW_OPS_STACK": STACK,
        "MLFLOW_OPS_SSH": sandbox.ssh_target,
        "MLFLOW_OPS_SSH_KEY": str(sandbox.key_path),
        "MLFLOW_OPS_AMI": sandbox.ami_id or "",
        "MLFLOW_OPS_ALLOWED_CIDR": "127.0.0.1/32",
        "MLFLOW_OPS_PORT": str(sandbox.mlflow_port),
        "MLFLOW_OPS_HTTPS_PORT": str(sandbox.https_port),
        # The guest has no instance role: the server reaches moto with these instead.
        "MLFLOW_OPS_SERVER_ENV": json.dumps({**aws, "AWS_DEFAULT_REGION": REGION}),
    }
    if SYSTEM_CA_BUNDLE.is_file():
        # Behind a TLS-inspecting proxy the guest needs this bundle to reach PyPI.
        variables["MLFLOW_OPS_CA_BUNDLE"] = str(SYSTEM_CA_BUNDLE)
    variables["MLFLOW_TRACKING_URI"] = sandbox.mlflow_url
    return variables


# Set in a developer's shell, these would send boto3 to a real account's profile or session.
UNSET_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN")


def env_exports(sandbox: Sandbox, logins: dict[str, str] | None = None) -> str:
    """Shell lines for ``eval "$(invoke sandbox.env)"``: unset, then export."""
    variables = {**env_vars(sandbox), **(logins or {})}
    return f"unset {' '.join(UNSET_VARS)}\n" + export_lines(variables)


@contextlib.contextmanager
def environment(sandbox: Sandbox) -> Iterator[None]:
    """Point this process at the sandbox while the block runs, as ``eval`` would."""
    saved = dict(os.environ)
    for name in UNSET_VARS:
        os.environ.pop(name, None)
    os.environ.update(env_vars(sandbox))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check_host(which: Callable[[str], str | None] = shutil.which) -> None:
    """Refuse, with a hint, a machine where the sandbox cannot run."""
    if sys.platform != "linux":
        raise OpsError(
            "the sandbox runs on Linux only: it boots its guest with systemd-nspawn",
            hint="use a Linux machine or VM, or provision a real stack",
        )
    if os.geteuid() != 0:
        raise OpsError(
            "the sandbox needs root: debootstrap and systemd-nspawn do",
            hint="run it as root, e.g. in a disposable Linux VM",
        )
    missing = [command for command in REQUIRED_COMMANDS if which(command) is None]
    if missing:
        raise OpsError(f"the sandbox needs {', '.join(missing)}", hint=DEPS_HINT)
    if not _moto_server().exists():
        raise OpsError(
            f"moto_server is not installed beside {sys.executable}",
            hint="install the requirements: pip install -r requirements.txt",
        )


def up(state_dir: Path = DEFAULT_STATE_DIR) -> Sandbox:
    """Bring the sandbox up: start what is not running and reuse the rest.

    :param state_dir: where the sandbox keeps its state, key, logs and guest.
    :returns: the running sandbox, as saved in ``state_dir``.
    :raises OpsError: when the machine cannot run it or a part does not come up;
        whatever did start is recorded, so ``down`` can stop it.
    """
    check_host()
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(state_dir / ".lock"):
        sandbox = load(state_dir) or _new_sandbox(state_dir)
        if sandbox.https_port is None:  # recorded by a version without TLS
            sandbox.https_port = _free_ports(1)[0]
        sandbox.save()
        changed = [
            _prepare_guest(sandbox),
            _ensure_moto(sandbox),
            _ensure_image(sandbox),
            _ensure_guest(sandbox),
        ]
    if not any(changed):
        note("the sandbox was already up: reused everything")
    return sandbox


def down(state_dir: Path = DEFAULT_STATE_DIR) -> None:
    """Stop what ``up`` started and remove the state directory; keep the root filesystem cache."""
    state_dir = Path(state_dir).resolve()
    sandbox = load(state_dir)
    if sandbox is None:
        note(f"no sandbox is up in {state_dir}: nothing to stop")
        return
    with _locked(state_dir / ".lock"):
        with phase("Stop the guest"):
            # SIGTERM to the supervisor shuts the guest down cleanly; a guest whose
            # supervisor was killed is stopped directly.
            stopped = _stop(sandbox.supervisor, "the guest's supervisor", sandbox.guest_log)
            stopped |= _stop(sandbox.guest_process(), "the guest", sandbox.guest_log)
            note("shut down" if stopped else "was not running")
        with phase("Stop moto"):
            stopped = _stop(sandbox.moto, "moto", sandbox.moto_log, kill_after=MOTO_STOP_TIMEOUT)
            note("stopped" if stopped else "was not running")
        with phase(f"Remove {state_dir}"):
            _remove_tree(state_dir)
            # The next guest makes new host keys and may get the same port.
            hostkeys.forget("127.0.0.1", sandbox.ssh_port)
            # And the sandbox stack's certificate, which clients were given.
            shutil.rmtree(user_dir() / STACK, ignore_errors=True)
            note("kept the root filesystem cache")


def _new_sandbox(state_dir: Path) -> Sandbox:
    moto_port, ssh_port, mlflow_port, https_port = _free_ports(4)
    # Named after its state directory, so sandboxes side by side get distinct names.
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]
    return Sandbox(
        state_dir=state_dir,
        machine=f"mlflow-ops-{digest}",
        moto_port=moto_port,
        ssh_port=ssh_port,
        mlflow_port=mlflow_port,
        https_port=https_port,
        key_path=state_dir / "id_ed25519",
        guest_root=state_dir / "guest",
        uv_cache=cache_home() / "uv",
        moto_log=state_dir / "moto.log",
        guest_log=state_dir / "guest.log",
        guest_pid_file=state_dir / "guest.pid",
    )


# The guest's files ------------------------------------------------------------------------------


def cache_home() -> Path:
    """Where mlflow-ops keeps caches that outlive a sandbox: ``$XDG_CACHE_HOME/mlflow-ops``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG specification says to ignore a relative path here.
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "mlflow-ops"


def rootfs_key() -> str:
    """Names a cached root filesystem after everything that went into it."""
    recipe = json.dumps([*DEBOOTSTRAP_ARGS, MIRROR, CUSTOMISATION_VERSION])
    return f"{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def rootfs_dir() -> Path:
    return cache_home() / "rootfs" / rootfs_key()


def ensure_rootfs() -> tuple[Path, bool]:
    """The cached root filesystem, built first if there is none.

    :returns: its path, and whether it was built just now.
    """
    root = rootfs_dir()
    if root.is_dir():
        return root, False
    root.parent.mkdir(parents=True, exist_ok=True)
    # Another `up` (a second clone, a parallel CI job) may be building the same
    # one: wait for it rather than build twice into one place.
    with _locked(root.with_name(root.name + ".lock")):
        if root.is_dir():
            return root, False
        partial = root.with_name(root.name + ".partial")
        log = root.with_name(root.name + ".log")
        _remove_tree(partial)  # left by a build that was interrupted
        try:
            _build_rootfs(partial, log)
        except BaseException:
            _remove_tree(partial)
            raise
        # Only a finished build gets the cache's name.
        partial.rename(root)
    return root, True


def _build_rootfs(root: Path, log: Path) -> None:
    with log.open("w") as output:
        _run(["debootstrap", *DEBOOTSTRAP_ARGS, str(root), MIRROR], output, "debootstrap", log)
        _customise(root, output, log)


def _customise(root: Path, output: IO[str], log: Path) -> None:
    """Make the debootstrapped tree into a host like an official Debian image."""

    def chroot(*argv: str) -> None:
        _run(["chroot", str(root), *argv], output, f"{argv[0]} in the new root", log)

    chroot("useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", GUEST_USER)
    sudoers = root / "etc/sudoers.d" / GUEST_USER
    sudoers.write_text(f"{GUEST_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    chroot("visudo", "--check", "--file", f"/etc/sudoers.d/{GUEST_USER}")

    (root / "etc/ssh/sshd_config.d/10-mlflow-ops.conf").write_text(
        "# Keys only, as on Debian's official images.\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin no\n"
    )
    chroot("systemctl", "enable", "ssh.service")

    # Each copy gets its own identity (see _give_identity); debootstrap made one
    # for the tree and copied this machine's hostname into it.
    for host_key in (root / "etc/ssh").glob("ssh_host_*"):
        host_key.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").unlink(missing_ok=True)
    chroot("apt-get", "clean")


def _prepare_guest(sandbox: Sandbox) -> bool:
    with phase("Prepare the guest's files"):
        changed = False
        if sandbox.guest_root.is_dir():
            note("reused its root filesystem")
        else:
            started = time.monotonic()
            rootfs, built = ensure_rootfs()
            if built:
                note(f"built {rootfs} in {time.monotonic() - started:.0f}s")
            _copy_guest(rootfs, sandbox)
            sandbox.rootfs = rootfs
            note("copied the cached root filesystem")
            changed = True
        if not sandbox.key_path.exists():
            key = ["-t", "ed25519", "-N", "", "-C", sandbox.machine, "-f", str(sandbox.key_path)]
            _run_quiet(["ssh-keygen", "-q", *key])
            note("made an SSH key")
            changed = True
        sandbox.save()
    return changed


def _copy_guest(rootfs: Path, sandbox: Sandbox) -> None:
    """Copy the cached root filesystem for this sandbox and give the copy its own identity."""
    partial = sandbox.guest_root.with_name(sandbox.guest_root.name + ".partial")
    _remove_tree(partial)  # left by a copy that was interrupted
    _run_quiet(["cp", "-a", "--reflink=auto", str(rootfs), str(partial)])
    _give_identity(partial, sandbox.machine)
    # Only a finished copy gets the guest's name.
    partial.rename(sandbox.guest_root)


def _give_identity(root: Path, machine: str) -> None:
    """Give a copy its own machine id, SSH host keys and name."""
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    _run_quiet(["ssh-keygen", "-A", "-f", str(root)])
    (root / "etc/hostname").write_text(machine + "\n")
    # sudo looks the hostname up, and would wait on DNS for a name it cannot find.
    (root / "etc/hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{machine}\n::1\tlocalhost ip6-localhost\n"
    )


def _configure_guest(sandbox: Sandbox) -> None:
    """Write the settings that may change between starts: sshd's port and the login key."""
    root = sandbox.guest_root
    _guest_path(root, "etc/ssh/sshd_config.d/20-sandbox.conf").write_text(
        "# Written by mlflow-ops at each start of the sandbox: the guest shares the\n"
        "# machine's network, so sshd takes a free loopback port.\n"
        f"Port {sandbox.ssh_port}\nListenAddress 127.0.0.1\n"
    )
    uid, gid = _guest_ids(root, GUEST_USER)
    ssh_dir = _guest_path(root, f"home/{GUEST_USER}/.ssh")
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = _guest_path(root, f"home/{GUEST_USER}/.ssh/authorized_keys")
    keys.write_text(sandbox.key_path.with_suffix(".pub").read_text())
    keys.chmod(0o600)
    for path in (ssh_dir, keys):
        os.chown(path, uid, gid)


def _guest_path(root: Path, relative: str) -> Path:
    """A path in a guest's tree, refused if any part of it is a symbolic link.

    Root in the guest owns these files: a link planted there would make this
    machine's root write wherever it points, outside the guest.
    """
    path = root
    for part in Path(relative).parts:
        path = path / part
        if path.is_symlink():
            raise OpsError(
                f"{path} is a symbolic link; the sandbox will not write through it",
                hint="run down, then up, to copy the guest afresh",
            )
    return path


def _guest_ids(root: Path, user: str) -> tuple[int, int]:
    """A guest user's uid and gid, from the guest's passwd file (not this machine's)."""
    for line in _guest_path(root, "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise OpsError(f"the guest has no user {user!r}", hint="run down, then up, to copy it afresh")


# moto -----------------------------------------------------------------------------------------


def _moto_server() -> Path:
    # Beside the interpreter, not on PATH: the one installed with this boto3.
    return Path(sys.executable).parent / "moto_server"


def _ensure_moto(sandbox: Sandbox) -> bool:
    with phase("Start moto, for the AWS APIs"):
        if sandbox.moto is not None and sandbox.moto.alive():
            _wait_for_moto(sandbox)
            note(f"already running on port {sandbox.moto_port}")
            return False
        if not _port_free(sandbox.moto_port):
            sandbox.moto_port = _free_ports(1)[0]
        argv = [str(_moto_server()), "-H", "127.0.0.1", "-p", str(sandbox.moto_port)]
        sandbox.moto = _launch(argv, sandbox.moto_log)
        sandbox.save()
        _wait_for_moto(sandbox)
        note(f"port {sandbox.moto_port}")
    return True


def _wait_for_moto(sandbox: Sandbox) -> None:
    port = sandbox.moto_port
    _wait_for(lambda: _probe_moto(port), "moto", port, sandbox.moto, sandbox.moto_log)


def _probe_moto(port: int) -> None:
    # http.client, unlike urllib, ignores any proxy set in the environment.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/moto-api/")
        status = connection.getresponse().status
    except OSError:
        raise _NotReady from None
    finally:
        connection.close()
    if status != 200:
        raise _NotReady


def ec2_client(sandbox: Sandbox):
    """An EC2 client for the sandbox's moto that reads nothing of the developer's AWS setup."""
    core = botocore.session.Session(
        session_vars={
            "profile": (None, None, None, None),
            "config_file": (None, None, os.devnull, None),
            "credentials_file": (None, None, os.devnull, None),
        }
    )
    session = boto3.session.Session(
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
        botocore_session=core,
    )
    return session.client("ec2", endpoint_url=sandbox.moto_url)


def _ensure_image(sandbox: Sandbox) -> bool:
    """Register the guest's image in moto, which has no Debian 12 image of its own."""
    with phase("Register the image in moto"):
        ec2 = ec2_client(sandbox)
        filters = [{"Name": "name", "Values": [IMAGE_NAME]}]
        images = ec2.describe_images(Owners=["self"], Filters=filters)["Images"]
        if images:
            sandbox.ami_id = images[0]["ImageId"]
            note(f"{sandbox.ami_id} already there")
            return False
        # moto keeps its state in memory: a moto started again has lost the image.
        description = "Debian 12 guest of the mlflow-ops sandbox (systemd-nspawn)"
        sandbox.ami_id = ec2.register_image(Name=IMAGE_NAME, Description=description)["ImageId"]
        sandbox.save()
        note(sandbox.ami_id)
    return True


# The guest --------------------------------------------------------------------------------------


def _ensure_guest(sandbox: Sandbox) -> bool:
    with phase("Boot the guest"):
        if sandbox.supervisor is not None and sandbox.supervisor.alive():
            _wait_for_ssh(sandbox)
            note(f"already running, SSH on port {sandbox.ssh_port}")
            return False
        # A guest whose supervisor was killed still holds its root filesystem.
        if _stop(sandbox.guest_process(), "the guest", sandbox.guest_log):
            note("stopped a guest left without its supervisor")
        if not _port_free(sandbox.ssh_port):
            sandbox.ssh_port = _free_ports(1)[0]
        sandbox.uv_cache.mkdir(parents=True, exist_ok=True)
        _configure_guest(sandbox)
        sandbox.supervisor = _launch(_supervisor_argv(sandbox), sandbox.guest_log)
        sandbox.save()
        _wait_for_ssh(sandbox)
        note(
            f"SSH on port {sandbox.ssh_port}, HTTPS port {sandbox.https_port}, "
            f"MLflow port {sandbox.mlflow_port}"
        )
    return True


def nspawn_argv(sandbox: Sandbox) -> list[str]:
    """The systemd-nspawn command line that boots the guest."""
    return [
        "systemd-nspawn",
        "-D",
        str(sandbox.guest_root),
        "--boot",
        # Without a system bus on the machine, registering with machined fails.
        "--register=no",
        "--keep-unit",
        "--console=passive",
        "--machine",
        sandbox.machine,
        f"--bind={sandbox.uv_cache}:{GUEST_UV_CACHE}",
    ]


def _supervisor_argv(sandbox: Sandbox) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ops.sandbox",
        "supervise",
        "--pid-file",
        str(sandbox.guest_pid_file),
        "--",
        *nspawn_argv(sandbox),
    ]


def _wait_for_ssh(sandbox: Sandbox) -> None:
    port = sandbox.ssh_port

    def probe() -> None:
        if not ssh_banner(port).startswith(b"SSH-"):
            raise _NotReady

    _wait_for(probe, "the guest", port, sandbox.supervisor, sandbox.guest_log)


def ssh_banner(port: int, host: str = "127.0.0.1") -> bytes:
    """The first bytes an SSH server sends on ``port``; empty when nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=2) as connection:
            return connection.recv(64)
    except OSError:
        return b""


def supervise(argv: list[str], pid_file: Path) -> int:
    """Run the guest; start it again when it exits for a reboot, until SIGTERM.

    SIGTERM (or SIGINT) is passed on to systemd-nspawn, which shuts the guest
    down cleanly; the supervisor exits once the guest is down.

    :returns: the exit status of the guest's last run.
    """
    stopping = False
    guest: subprocess.Popen | None = None

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if guest is not None and guest.poll() is None:
            guest.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            _log(f"starting the guest: {shlex.join(argv)}")
            guest = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            _write_pid_file(pid_file, Process.of(guest.pid))
            if stopping:  # SIGTERM came before there was a guest to pass it to
                guest.send_signal(signal.SIGTERM)
            status = guest.wait()
            if stopping or status != REBOOT_STATUS:
                _log(f"the guest exited with status {status}")
                return status
            _log("the guest rebooted")
    finally:
        pid_file.unlink(missing_ok=True)


def _write_pid_file(path: Path, process: Process) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(dataclasses.asdict(process)))
    os.replace(partial, path)


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} supervisor: {message}", flush=True)


# Processes, ports and files ---------------------------------------------------------------------


def _launch(argv: list[str], log: Path) -> Process:
    """Start a process that outlives this one: its own session, no input, output to ``log``."""
    with log.open("a") as output:
        output.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
        output.flush()
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,  # so that `python -m ops.sandbox` finds this package
        )
    # Kept so that the interpreter does not report a child still running when it
    # exits; Process.alive collects the exit status.
    _LAUNCHED.append(child)
    return Process.of(child.pid)


_LAUNCHED: list[subprocess.Popen] = []


def _stop(process: Process | None, what: str, log: Path, kill_after: float | None = None) -> bool:
    """Send SIGTERM to a process the sandbox started and wait until it is gone.

    :param kill_after: send SIGKILL after this many seconds; by default give
        up after ``STOP_TIMEOUT`` and raise, since a guest is never killed.
    :returns: whether it was running.
    """
    if process is None or not process.alive():
        return False
    os.kill(process.pid, signal.SIGTERM)
    if process.wait(kill_after or STOP_TIMEOUT):
        return True
    if kill_after is not None:
        os.kill(process.pid, signal.SIGKILL)
        if process.wait(MOTO_STOP_TIMEOUT):
            return True
    raise OpsError(
        f"{what} (pid {process.pid}) did not stop within {STOP_TIMEOUT:.0f}s",
        hint=f"see {log}; run down again once it has stopped",
    )


class _NotReady(Exception):
    """Raised by a probe to ask for another try."""


def _wait_for(
    probe: Callable[[], None], what: str, port: int, process: Process | None, log: Path
) -> None:
    """Call ``probe`` until it stops raising ``_NotReady``, for up to ``START_TIMEOUT``.

    Gives up at once if ``process``, which should be answering, has exited.
    """

    def attempt() -> None:
        if process is None or not process.alive():
            raise OpsError(f"{what} exited before answering on port {port}", hint=f"see {log}")
        probe()

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_NotReady),
        stop=tenacity.stop_after_delay(START_TIMEOUT),
        wait=tenacity.wait_fixed(0.5),
    )
    try:
        retrying(attempt)
    except tenacity.RetryError:
        raise OpsError(
            f"{what} did not answer on port {port} within {START_TIMEOUT:.0f}s", hint=f"see {log}"
        ) from None


def _free_ports(count: int) -> list[int]:
    """Distinct ports that are free on the loopback address now."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            probe = stack.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove_tree(path: Path) -> None:
    """Remove a directory tree, first unmounting anything mounted inside it.

    An interrupted debootstrap leaves /proc and /sys mounted in its target;
    removing files through such a mount would reach this machine's own.
    """
    if not path.exists():
        return
    for mount in _mounts_under(path.resolve()):
        _run_quiet(["umount", "--lazy", str(mount)])
    shutil.rmtree(path)


def _mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # The fifth field is the mount point, with spaces and such as octal escapes.
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]))
        if point == path or path in point.parents:
            mounts.append(point)
    return sorted(mounts, key=lambda point: len(point.parts), reverse=True)


def _run(argv: list[str], output: IO[str], what: str, log: Path) -> None:
    # A plain PATH: commands run in the guest's root must not look for the machine's tools.
    env = {**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    result = subprocess.run(argv, stdout=output, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise OpsError(f"{what} failed", hint=f"see {log}")


def _run_quiet(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise OpsError(f"{shlex.join(argv)} failed: {result.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.sandbox")
    commands = parser.add_subparsers(dest="command", required=True)
    supervisor = commands.add_parser(
        "supervise", help="run the guest, starting it again after each reboot inside it"
    )
    supervisor.add_argument("--pid-file", type=Path, required=True, help="where to record it")
    supervisor.add_argument("nspawn", nargs=argparse.REMAINDER, help="-- systemd-nspawn ...")
    args = parser.parse_args(argv)
    nspawn = args.nspawn[1:] if args.nspawn[:1] == ["--"] else args.nspawn
    if not nspawn:
        parser.error("give the systemd-nspawn command line after --")
    return supervise(nspawn, args.pid_file)


if __name__ == "__main__":
    sys.exit(main())
