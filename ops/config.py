"""Settings of one stack, resolved in one documented order.

A setting's value comes from the first of these that gives one:

1. the task's command-line argument (``--instance-type t3.medium``);
2. the environment variable ``MLFLOW_OPS_<NAME>`` (``MLFLOW_OPS_INSTANCE_TYPE``);
3. the ``mlflow_ops`` key of Invoke's configuration: the project's
   ``invoke.yaml``, which holds every default, merged with any file of the
   user's own such as ``~/.invoke.yaml``.

Every setting is declared once in ``SETTINGS``, with its type and the help
line that the tasks show for it; its default lives in ``invoke.yaml`` alone.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ops.errors import OpsError

ENV_PREFIX = "MLFLOW_OPS_"
CONFIG_KEY = "mlflow_ops"
PROJECT_CONFIG = Path(__file__).resolve().parent.parent / "invoke.yaml"

# Every resource the toolkit creates carries this tag, with the stack's name
# as its value: it is how any teammate's `invoke status` finds the stack.
STACK_TAG = "mlflow-ops:stack"


def _text(value: Any) -> str:
    return str(value)


def _integer(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a whole number") from None


def _path(value: Any) -> Path:
    return Path(os.path.expanduser(str(value)))


def _mapping(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object ({exc})") from None
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of names to values")
    return {str(key): str(item) for key, item in value.items()}


def parse_bool(value: Any) -> bool:
    """Read a yes/no value as people write it; anything else is an error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"{value!r} is not a yes/no value")


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one setting is read, and the line that explains it."""

    parse: Callable[[Any], Any]
    help: str
    optional: bool = False


SETTINGS: dict[str, Spec] = {
    "stack": Spec(_text, "name of the stack; several can live side by side"),
    "region": Spec(
        _text,
        "AWS region (default: AWS_REGION, AWS_DEFAULT_REGION or the profile's)",
        optional=True,
    ),
    "instance_type": Spec(_text, "EC2 instance type"),
    "ami": Spec(_text, "AMI id (default: the latest official Debian 12 image)", optional=True),
    "volume_size": Spec(_integer, "size of the root volume in GiB"),
    "allowed_cidr": Spec(
        _text,
        "address range allowed to reach SSH and HTTPS, e.g. 203.0.113.7/32",
        optional=True,
    ),
    "ssh_user": Spec(_text, "SSH user with sudo on the host"),
    "ssh_key": Spec(_path, "private SSH key for the host; its .pub is the stack's key pair"),
    "ssh": Spec(
        _text,
        "act on this host instead of the stack's instance: user@address[:port]",
        optional=True,
    ),
    "mlflow_version": Spec(_text, "MLflow version the host runs (deploy installs it)"),
    "port": Spec(_integer, "port MLflow listens on, on the host's loopback only"),
    "https_port": Spec(_integer, "port nginx serves MLflow on over TLS"),
    "tls_cert": Spec(
        _path,
        "TLS certificate (PEM, with its chain) for nginx (default: a self-signed one)",
        optional=True,
    ),
    "tls_key": Spec(_path, "private key (PEM) of tls_cert", optional=True),
    "private": Spec(parse_bool, "open only SSH: reach the server with `invoke tunnel`"),
    "workers": Spec(_integer, "number of MLflow server worker processes"),
    "jobs": Spec(
        parse_bool, "run MLflow's job runner (LLM judges, online scoring): about 1.3 GiB more"
    ),
    "bucket": Spec(
        _text, "artifact bucket (default: mlflow-ops-STACK-ACCOUNT-REGION)", optional=True
    ),
    "artifacts_destination": Spec(
        _text,
        "where the server keeps artifacts (default: s3://BUCKET/artifacts)",
        optional=True,
    ),
    "ca_bundle": Spec(
        _path,
        "CA bundle the host must trust to reach package indexes (corporate proxy)",
        optional=True,
    ),
    "server_env": Spec(_mapping, "extra environment for the server, as a JSON object"),
    "backup_keep": Spec(_integer, "number of backups kept; older ones are pruned after a backup"),
    "backup_schedule": Spec(_text, "when the host backs up: a systemd OnCalendar value"),
    "backup_max_age_hours": Spec(_integer, "status fails when the newest backup is older"),
    "auth": Spec(parse_bool, "require a login (MLflow basic auth); passwords are kept in SSM"),
}

ARTIFACT_PREFIX = "artifacts"
BACKUP_PREFIX = "backups"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved settings of one stack; see ``SETTINGS`` for each field."""

    stack: str
    region: str | None
    instance_type: str
    ami: str | None
    volume_size: int
    allowed_cidr: str | None
    ssh_user: str
    ssh_key: Path
    ssh: str | None
    mlflow_version: str
    port: int
    https_port: int
    tls_cert: Path | None
    tls_key: Path | None
    private: bool
    workers: int
    jobs: bool
    bucket: str | None
    artifacts_destination: str | None
    ca_bundle: Path | None
    server_env: dict[str, str]
    backup_keep: int
    backup_schedule: str
    backup_max_age_hours: int
    auth: bool

    @property
    def tags(self) -> dict[str, str]:
        return {STACK_TAG: self.stack}

    @property
    def resource_name(self) -> str:
        """The name given to the stack's named resources (role, key pair, ...)."""
        return f"mlflow-ops-{self.stack}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def help_for(*names: str) -> dict[str, str]:
    """The ``help=`` mapping of an Invoke task that takes these settings."""
    return {name: SETTINGS[name].help for name in names}


def resolve(
    file_values: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    args: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve every setting: argument, then environment, then file, then default."""
    file_values = dict(file_values or {})
    env = os.environ if env is None else env
    args = args or {}

    unknown = sorted(set(file_values) - set(SETTINGS))
    if unknown:
        raise OpsError(
            f"unknown setting(s) under '{CONFIG_KEY}' in the configuration: {', '.join(unknown)}",
            hint=f"known settings: {', '.join(SETTINGS)}",
        )

    values = {}
    for name, spec in SETTINGS.items():
        env_name = ENV_PREFIX + name.upper()
        if args.get(name) is not None:
            raw, source = args[name], f"--{name.replace('_', '-')}"
        elif env.get(env_name, "") != "":
            raw, source = env[env_name], env_name
        elif file_values.get(name) is not None:
            raw, source = file_values[name], f"{CONFIG_KEY}.{name}"
        elif spec.optional:
            values[name] = None
            continue
        else:
            raise OpsError(
                f"setting '{name}' has no value",
                hint=f"set it under '{CONFIG_KEY}' in invoke.yaml, or with {env_name}",
            )
        try:
            values[name] = spec.parse(raw)
        except ValueError as exc:
            raise OpsError(f"bad value for {source}: {exc}") from None

    settings = Settings(**values)
    validate(settings)
    return settings


def load(config: Mapping[str, Any] | None = None, **args: Any) -> Settings:
    """Resolve settings for a task.

    ``config`` is the task's Invoke configuration; when it has no
    ``mlflow_ops`` key (a Fabric run reads ``fabric.yaml``, not
    ``invoke.yaml``), the project's ``invoke.yaml`` is read instead.
    """
    file_values = None
    if config is not None:
        file_values = config.get(CONFIG_KEY)
    if file_values is None and PROJECT_CONFIG.exists():
        file_values = (yaml.safe_load(PROJECT_CONFIG.read_text()) or {}).get(CONFIG_KEY)
    return resolve(file_values=file_values, args=args)


_STACK_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")


def validate(settings: Settings) -> None:
    """Refuse values that would fail later, half-way through a change."""
    if not _STACK_NAME.match(settings.stack):
        raise OpsError(
            f"invalid stack name {settings.stack!r}",
            hint="use 1 to 20 lowercase letters, digits and hyphens, e.g. --stack dev",
        )
    if settings.allowed_cidr is not None:
        check_cidr(settings.allowed_cidr)
    if settings.bucket is not None:
        check_bucket_name(settings.bucket)
    for name in ("port", "https_port"):
        if not 1 <= getattr(settings, name) <= 65535:
            raise OpsError(f"{name} {getattr(settings, name)} is out of range", hint="use 1-65535")
    if settings.port == settings.https_port:
        raise OpsError(
            f"port and https_port are both {settings.port}",
            hint="MLflow listens on loopback behind nginx: give them different ports",
        )
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise OpsError(
            "tls_cert and tls_key go together",
            hint="give both, or neither for a self-signed certificate",
        )
    if settings.workers < 1:
        raise OpsError("workers must be at least 1")
    if settings.backup_keep < 1:
        raise OpsError("backup_keep must be at least 1: the newest backup is always kept")
    if settings.ssh is not None:
        parse_host(settings.ssh, settings.ssh_user)


def check_cidr(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse an address range, refusing host bits set past the prefix."""
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise OpsError(
            f"malformed CIDR {cidr!r}: {exc}",
            hint="give an address range such as 203.0.113.7/32 (one address) or 10.0.0.0/16",
        ) from None


_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def check_bucket_name(name: str) -> str:
    """Apply S3's naming rules before any request is made."""
    if (
        not _BUCKET_NAME.match(name)
        or ".." in name
        or re.match(r"^\d+\.\d+\.\d+\.\d+$", name)
        or name.startswith("xn--")
        or name.endswith("-s3alias")
    ):
        raise OpsError(
            f"invalid bucket name {name!r}",
            hint="use 3-63 lowercase letters, digits, dots and hyphens, starting and ending "
            "with a letter or digit",
        )
    return name


def parse_host(host: str, default_user: str) -> tuple[str, str, int]:
    """Split ``user@address[:port]`` into its parts (user and port optional)."""
    user, _, rest = host.rpartition("@")
    user = user or default_user
    address, port = rest, 22
    if rest.startswith("["):  # [IPv6]:port
        address, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = tail[1:]
    elif rest.count(":") == 1:
        address, port = rest.split(":")
    try:
        port = int(port)
    except ValueError:
        port = -1
    if not address or not 1 <= port <= 65535:
        raise OpsError(
            f"malformed host {host!r}", hint="write it as user@address or user@address:port"
        )
    return user, address, port


def user_dir() -> Path:
    """The operator's own mlflow-ops files: ``$XDG_CONFIG_HOME/mlflow-ops``."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG specification says to ignore a relative path here.
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "mlflow-ops"
