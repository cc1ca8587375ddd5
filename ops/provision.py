"""Create, find and remove the AWS side of a stack.

``plan`` reads AWS and checks every input before anything exists; ``apply``
creates or completes the stack and waits until its host answers SSH;
``describe`` is the cheap look-up that ``deploy`` and ``status`` use;
``destroy`` removes what ``apply`` made and keeps the data unless told.

Every resource is found again by the stack tag (``settings.tags``) or by a
name derived from the stack, never by an id kept on someone's laptop. So a
second run changes nothing, a run that stopped half-way is completed by the
next one, and stacks side by side never see each other.

Known limits:

- An instance whose type or image no longer matches the settings is reported,
  not replaced: replacing it would lose the metadata database on its disk.
- A bucket named with ``--bucket`` that this stack did not create is used as it
  is; its public access, encryption and versioning are not changed.
- The default image is read from Debian's public SSM parameter. moto has no
  such parameter and refuses to create one, so the tests seed it in moto's
  in-process state, and the sandbox passes an AMI id instead.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tenacity
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ops import hostkeys, logins
from ops.aws import Aws, AwsError, tag_dict
from ops.config import (
    ARTIFACT_PREFIX,
    BACKUP_PREFIX,
    STACK_TAG,
    Settings,
    check_bucket_name,
    check_cidr,
    parse_host,
)
from ops.console import console, note, phase
from ops.errors import OpsError
from ops.templating import TEMPLATES, render

# Debian's official images: the SSM parameter that names the newest one, and
# the account that publishes them, for regions where the parameter is missing.
DEBIAN_PARAMETER = "/aws/service/debian/release/12/latest/{arch}"
DEBIAN_OWNER = "136693071363"
DEBIAN_NAME = "debian-12-{arch}-*"

# The resources of a stack, in the order they are created.
BUCKET = "artifact bucket"
ROLE = "instance role"
PROFILE = "instance profile"
SECURITY_GROUP = "security group"
KEY_PAIR = "key pair"
INSTANCE = "instance"
ADDRESS = "Elastic IP"
SECRETS = "secrets in SSM"
RESOURCES = (BUCKET, ROLE, PROFILE, SECURITY_GROUP, KEY_PAIR, INSTANCE, ADDRESS)

# Actions a plan proposes, and what was done.
CREATE, UPDATE, UNCHANGED = "create", "update", "unchanged"
CREATED, UPDATED, REMOVED, KEPT, ABSENT = "created", "updated", "removed", "kept", "absent"

_WORLD = {"0.0.0.0/0", "::/0"}
_KEY_TYPES = ("ssh-ed25519", "ssh-rsa")  # the two that EC2 imports
_POLICY_NAME = "mlflow-ops-artifacts"
_PUBLIC_ACCESS = (
    "BlockPublicAcls",
    "IgnorePublicAcls",
    "BlockPublicPolicy",
    "RestrictPublicBuckets",
)


@dataclasses.dataclass(frozen=True)
class Names:
    """The deterministic names of a stack's resources in one account and region."""

    bucket: str
    default_bucket: str
    role: str
    profile: str
    security_group: str
    key_pair: str


def bucket_name(settings: Settings, account_id: str, region: str) -> str:
    """The artifact bucket: ``settings.bucket``, or one named after stack, account and region."""
    return settings.bucket or _default_bucket(settings, account_id, region)


def _default_bucket(settings: Settings, account_id: str, region: str) -> str:
    return f"mlflow-ops-{settings.stack}-{account_id}-{region}"


def stack_names(settings: Settings, account_id: str, region: str) -> Names:
    # IAM is global: the region in the role's name keeps one stack name usable
    # in several regions of the same account.
    iam_name = f"{settings.resource_name}-{region}"
    return Names(
        bucket=bucket_name(settings, account_id, region),
        default_bucket=_default_bucket(settings, account_id, region),
        role=iam_name,
        profile=iam_name,
        security_group=settings.resource_name,
        key_pair=settings.resource_name,
    )


def ssh_address(settings: Settings, public_address: str | None) -> tuple[str, str, int]:
    """User, address and port to reach the host: ``settings.ssh``, else the stack's address."""
    if settings.ssh:
        return parse_host(settings.ssh, settings.ssh_user)
    if not public_address:
        raise OpsError(
            f"stack {settings.stack} has no public address",
            hint="run `invoke provision` first, or pass --host user@address",
        )
    return settings.ssh_user, public_address, 22


# Plans and results


@dataclasses.dataclass(frozen=True)
class Step:
    """What ``apply`` would do to one resource, and why."""

    resource: str
    name: str
    action: str
    why: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Checked inputs and the proposed action for each resource of the stack."""

    settings: Settings
    region: str
    account_id: str
    names: Names
    image_id: str
    root_device: str
    public_key: str
    vpc_id: str
    policy: dict[str, Any]
    steps: tuple[Step, ...]
    warnings: tuple[str, ...] = ()

    def action(self, resource: str) -> str:
        return next(step.action for step in self.steps if step.resource == resource)

    @property
    def changes(self) -> list[Step]:
        return [step for step in self.steps if step.action != UNCHANGED]

    def table(self) -> Table:
        table = Table(
            title=f"plan for stack {self.settings.stack} in {self.region}", title_justify="left"
        )
        table.add_column("resource")
        table.add_column("name", no_wrap=True)
        table.add_column("action")
        table.add_column("why")
        colour = {CREATE: "green", UPDATE: "yellow", UNCHANGED: "dim"}
        for step in self.steps:
            action = f"[{colour[step.action]}]{step.action}[/]"
            table.add_row(step.resource, step.name, action, step.why)
        return table

    def show(self) -> None:
        console.print(self.table())

    def as_dict(self) -> dict[str, Any]:
        return {
            "stack": self.settings.stack,
            "region": self.region,
            "image_id": self.image_id,
            "steps": [dataclasses.asdict(step) for step in self.steps],
            "warnings": list(self.warnings),
        }


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What was done to one resource."""

    resource: str
    name: str
    action: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Result:
    """What ``apply`` or ``destroy`` did, resource by resource."""

    stack: str
    region: str
    outcomes: tuple[Outcome, ...]
    instance_id: str | None = None
    public_address: str | None = None
    ssh: str | None = None

    def action(self, resource: str) -> str:
        return next(item.action for item in self.outcomes if item.resource == resource)

    def of(self, action: str) -> list[Outcome]:
        return [item for item in self.outcomes if item.action == action]

    @property
    def changed(self) -> bool:
        return any(item.action not in {UNCHANGED, ABSENT, KEPT} for item in self.outcomes)

    def table(self) -> Table:
        table = Table(title=f"stack {self.stack} in {self.region}", title_justify="left")
        table.add_column("resource")
        table.add_column("id", no_wrap=True)  # ids are copied from here: never cut them
        table.add_column("action")
        table.add_column("detail")
        colour = {CREATED: "green", UPDATED: "yellow", REMOVED: "red", KEPT: "cyan"}
        for item in self.outcomes:
            action = f"[{colour.get(item.action, 'dim')}]{item.action}[/]"
            table.add_row(item.resource, item.name, action, item.detail)
        return table

    def show(self) -> None:
        console.print(self.table())

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StackState:
    """Where a stack's parts are, as found in AWS; ``None`` where a part is missing."""

    stack: str
    region: str
    instance_id: str | None
    instance_state: str | None
    public_address: str | None
    bucket: str
    bucket_exists: bool
    security_group_id: str | None

    @property
    def exists(self) -> bool:
        """Whether anything but the (deliberately kept) bucket is there."""
        return any((self.instance_id, self.public_address, self.security_group_id))

    @property
    def artifacts_uri(self) -> str:
        return f"s3://{self.bucket}/{ARTIFACT_PREFIX}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Inputs


def read_public_key(private_key: Path) -> str:
    """The ``type base64`` part of ``<private_key>.pub``; the private key is never opened."""
    path = private_key.with_name(private_key.name + ".pub")
    make_one = (
        f"create a key with `ssh-keygen -t ed25519 -f {private_key}`, "
        "or point --ssh-key at a private key whose .pub file sits next to it"
    )
    if not path.is_file():
        raise OpsError(f"public key {path} not found", hint=make_one)
    try:
        fields = path.read_text().split()
        kind, body = fields[0], fields[1]
        blob = base64.b64decode(body, validate=True)
        (length,) = struct.unpack(">I", blob[:4])
        embedded = blob[4 : 4 + length].decode()
    except (IndexError, UnicodeDecodeError, binascii.Error, struct.error):
        raise OpsError(f"{path} is not an OpenSSH public key", hint=make_one) from None
    if kind not in _KEY_TYPES or embedded != kind:
        raise OpsError(
            f"{path} holds a {kind} key; EC2 imports only {' and '.join(_KEY_TYPES)} keys",
            hint=make_one,
        )
    # The comment is left out: it often names the user and the laptop.
    return f"{kind} {body}"


def _allowed_cidr(settings: Settings) -> tuple[str, list[str]]:
    if settings.allowed_cidr is None:
        raise OpsError(
            "provision needs the address range allowed to reach SSH and HTTPS",
            hint="pass --allowed-cidr YOUR.ADDRESS/32 (your address: `curl -s "
            "https://checkip.amazonaws.com`); 0.0.0.0/0 opens the server to the world",
        )
    cidr = str(check_cidr(settings.allowed_cidr))
    warnings = []
    if cidr in _WORLD:
        warnings.append(
            f"--allowed-cidr {cidr} opens {_ports_text(open_ports(settings))} to the whole "
            "internet; prefer your own address/32"
        )
    return cidr, warnings


def _architecture(aws: Aws, instance_type: str) -> str:
    """Debian's name for the instance type's architecture: amd64 or arm64."""
    info = aws.instance_type(instance_type)
    if info is None:
        raise OpsError(
            f"instance type {instance_type} does not exist in {aws.region}",
            hint="choose one listed by `aws ec2 describe-instance-types`, e.g. t3.small",
        )
    architectures = info.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    return "arm64" if "arm64" in architectures else "amd64"


def _image(settings: Settings, aws: Aws, arch: str) -> dict[str, Any]:
    """The AMI to start: ``settings.ami``, else the newest official Debian 12 image."""
    if settings.ami:
        image = aws.image(settings.ami)
        if image is None:
            raise OpsError(
                f"image {settings.ami} does not exist in {aws.region}",
                hint="check the AMI id and region, or leave --ami unset for Debian 12",
            )
    else:
        image_id = aws.parameter(DEBIAN_PARAMETER.format(arch=arch))
        image = aws.image(image_id) if image_id else None
        if image is None:
            candidates = aws.images(DEBIAN_OWNER, DEBIAN_NAME.format(arch=arch), _ec2_arch(arch))
            image = max(candidates, key=lambda item: item["CreationDate"], default=None)
        if image is None:
            raise OpsError(
                f"no official Debian 12 {arch} image found in {aws.region}",
                hint="pass --ami with the id of a Debian 12 image (or set MLFLOW_OPS_AMI)",
            )
    # moto leaves out Architecture on images it registers; AWS always gives it.
    image_arch = image.get("Architecture")
    if image_arch and image_arch != _ec2_arch(arch):
        raise OpsError(
            f"image {image['ImageId']} is built for {image_arch}, but {settings.instance_type} "
            f"runs {_ec2_arch(arch)}",
            hint="choose an image and an instance type of the same architecture",
        )
    return image


def _ec2_arch(debian_arch: str) -> str:
    return {"amd64": "x86_64"}.get(debian_arch, debian_arch)


def _render_policy(bucket: str) -> dict[str, Any]:
    text = render(
        "instance-policy.json.j2", bucket=bucket, prefixes=[ARTIFACT_PREFIX, BACKUP_PREFIX]
    )
    return json.loads(text)


def _trust_policy() -> str:
    return (TEMPLATES / "trust-policy.json").read_text()


# Finding what exists


def _ec2_tags(settings: Settings) -> dict[str, str]:
    return {**settings.tags, "Name": settings.resource_name}


def _one(kind: str, items: list[dict[str, Any]], key: str, settings: Settings) -> Any:
    if len(items) > 1:
        ids = ", ".join(item[key] for item in items)
        raise OpsError(
            f"stack {settings.stack} has {len(items)} {kind}s ({ids}); it should have one",
            hint=f"remove all but one: they carry the tag {STACK_TAG}={settings.stack}",
        )
    return items[0] if items else None


def _find_instance(aws: Aws, settings: Settings) -> dict[str, Any] | None:
    return _one("instance", aws.instances(settings.tags), "InstanceId", settings)


def _find_address(aws: Aws, settings: Settings) -> dict[str, Any] | None:
    return _one("Elastic IP", aws.addresses(settings.tags), "AllocationId", settings)


def _bucket_is_ours(aws: Aws, settings: Settings, names: Names) -> bool:
    # The default name carries the stack, account and region, so a bucket of
    # that name is this stack's even before the tag is on (an interrupted run).
    if names.bucket == names.default_bucket:
        return True
    return aws.bucket_tags(names.bucket).get(STACK_TAG) == settings.stack


def _bucket_settings(
    aws: Aws, bucket: str, tags: dict[str, str]
) -> list[tuple[str, Callable[[], bool], Callable[[], None]]]:
    """Each safety setting of the bucket: its name, a check, and the fix."""
    return [
        (
            "public access blocked",
            lambda: all(aws.public_access_block(bucket).get(key) for key in _PUBLIC_ACCESS),
            lambda: aws.block_public_access(bucket),
        ),
        (
            "default encryption",
            lambda: bool(aws.bucket_encryption(bucket)),
            lambda: aws.encrypt_bucket(bucket),
        ),
        (
            "versioning",
            lambda: aws.bucket_versioning(bucket) == "Enabled",
            lambda: aws.enable_versioning(bucket),
        ),
        (
            "stack tag",
            lambda: tags.items() <= aws.bucket_tags(bucket).items(),
            lambda: aws.tag_bucket(bucket, {**aws.bucket_tags(bucket), **tags}),
        ),
    ]


def _find_security_group(aws: Aws, names: Names, vpc_id: str) -> dict[str, Any] | None:
    groups = aws.security_groups(names.security_group, vpc_id=vpc_id)
    return groups[0] if groups else None


Rule = tuple[str, int | None, int | None, str]


def _current_rules(group: dict[str, Any]) -> dict[Rule, dict[str, Any]]:
    """The group's ingress, one entry per source, each in the form revoke takes."""
    rules: dict[Rule, dict[str, Any]] = {}
    for permission in group.get("IpPermissions", []):
        base = {k: permission[k] for k in ("IpProtocol", "FromPort", "ToPort") if k in permission}
        head = (permission["IpProtocol"], permission.get("FromPort"), permission.get("ToPort"))
        for field, source in (
            ("IpRanges", "CidrIp"),
            ("Ipv6Ranges", "CidrIpv6"),
            ("UserIdGroupPairs", "GroupId"),
            ("PrefixListIds", "PrefixListId"),
        ):
            for entry in permission.get(field, []):
                rules[(*head, entry[source])] = {**base, field: [{source: entry[source]}]}
    return rules


def open_ports(settings: Settings) -> tuple[tuple[int, str], ...]:
    """The ports the security group opens: SSH, and nginx's HTTPS unless the stack is private.

    MLflow's own port is never opened: it listens on the host's loopback.
    """
    if settings.private:
        return ((22, "SSH"),)
    return ((22, "SSH"), (settings.https_port, "HTTPS"))


def _ports_text(ports: tuple[tuple[int, str], ...]) -> str:
    return " and ".join(f"{label} ({number})" for number, label in ports)


def _wanted_rules(cidr: str, ports: tuple[tuple[int, str], ...]) -> dict[Rule, dict[str, Any]]:
    field, source = ("Ipv6Ranges", "CidrIpv6") if ":" in cidr else ("IpRanges", "CidrIp")
    rules: dict[Rule, dict[str, Any]] = {}
    for number, label in ports:
        rules[("tcp", number, number, cidr)] = {
            "IpProtocol": "tcp",
            "FromPort": number,
            "ToPort": number,
            field: [{source: cidr, "Description": f"{label} (mlflow-ops)"}],
        }
    return rules


def _rule_text(rule: Rule) -> str:
    protocol, low, high, source = rule
    if protocol == "-1":
        return f"all traffic from {source}"
    ports = str(low) if low == high else f"{low}-{high}"
    return f"{protocol} {ports} from {source}"


def _rule_changes(
    group: dict[str, Any] | None, cidr: str, ports: tuple[tuple[int, str], ...]
) -> tuple[list, list]:
    """Rules to revoke and rules to authorize so that the group opens only what is wanted."""
    current = _current_rules(group) if group else {}
    wanted = _wanted_rules(cidr, ports)
    extra = [(rule, current[rule]) for rule in current if rule not in wanted]
    missing = [(rule, wanted[rule]) for rule in wanted if rule not in current]
    return extra, missing


def _same_key(a: str, b: str) -> bool:
    return a.split()[:2] == b.split()[:2]


def _check_key_pair(existing: dict[str, Any] | None, public_key: str, name: str) -> None:
    if existing and existing.get("PublicKey") and not _same_key(existing["PublicKey"], public_key):
        raise OpsError(
            f"key pair {name} already exists with a different public key",
            hint=f"point --ssh-key at the key it was made from, or delete the stale one with "
            f"`aws ec2 delete-key-pair --key-name {name}` and run again",
        )


def _instance_drift(instance: dict[str, Any], settings: Settings) -> str:
    if instance["InstanceType"] != settings.instance_type:
        return (
            f"runs {instance['InstanceType']}, settings say {settings.instance_type}: "
            "destroy and provision again to change it"
        )
    if settings.ami and instance["ImageId"] != settings.ami:
        return f"runs {instance['ImageId']}, settings say {settings.ami}"
    return ""


# plan


def plan(settings: Settings, aws: Aws) -> Plan:
    """Check every input and compare the stack with AWS; reads only, creates nothing."""
    with phase(f"checking the inputs of stack {settings.stack}"):
        cidr, warnings = _allowed_cidr(settings)
        if 22 in (settings.port, settings.https_port):
            raise OpsError(
                "neither MLflow nor nginx can listen on port 22: sshd uses it",
                hint="use --port 5000 and --https-port 443",
            )
        public_key = read_public_key(settings.ssh_key)
        names = stack_names(settings, aws.account_id, aws.region)
        check_bucket_name(names.bucket)
        arch = _architecture(aws, settings.instance_type)
        image = _image(settings, aws, arch)
        vpc_id = aws.default_vpc_id()
        if vpc_id is None:
            raise OpsError(
                f"region {aws.region} has no default VPC",
                hint="create one with `aws ec2 create-default-vpc`",
            )
        note(f"{image['ImageId']} ({image.get('Name', 'unnamed')})")
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")

    with phase("comparing the stack with AWS"):
        policy = _render_policy(names.bucket)
        steps = (
            _plan_bucket(aws, settings, names),
            *_plan_iam(aws, names, policy),
            _plan_security_group(aws, names, vpc_id, cidr, open_ports(settings)),
            _plan_key_pair(aws, names, public_key),
            *_plan_instance(aws, settings, image),
        )
        note(f"{sum(step.action != UNCHANGED for step in steps)} to change")
    return Plan(
        settings=settings,
        region=aws.region,
        account_id=aws.account_id,
        names=names,
        image_id=image["ImageId"],
        root_device=image.get("RootDeviceName") or "/dev/xvda",
        public_key=public_key,
        vpc_id=vpc_id,
        policy=policy,
        steps=steps,
        warnings=tuple(warnings),
    )


def _plan_bucket(aws: Aws, settings: Settings, names: Names) -> Step:
    bucket = names.bucket
    if not aws.bucket_exists(bucket):
        return Step(BUCKET, bucket, CREATE, "private, encrypted (SSE-S3), versioned")
    if not _bucket_is_ours(aws, settings, names):
        return Step(BUCKET, bucket, UNCHANGED, "exists, not made by this stack: used as it is")
    gaps = [name for name, ok, _ in _bucket_settings(aws, bucket, settings.tags) if not ok()]
    if gaps:
        return Step(BUCKET, bucket, UPDATE, "missing: " + ", ".join(gaps))
    return Step(BUCKET, bucket, UNCHANGED, "exists, private, encrypted, versioned")


def _plan_iam(aws: Aws, names: Names, policy: dict[str, Any]) -> tuple[Step, Step]:
    if aws.role(names.role) is None:
        role = Step(ROLE, names.role, CREATE, "may use only the artifacts/ and backups/ prefixes")
    elif aws.role_policy(names.role, _POLICY_NAME) != policy:
        role = Step(ROLE, names.role, UPDATE, "its policy differs from the template")
    else:
        role = Step(ROLE, names.role, UNCHANGED, "exists with the expected policy")
    profile = aws.instance_profile(names.profile)
    if profile is None:
        return role, Step(PROFILE, names.profile, CREATE, f"holds role {names.role}")
    if names.role not in [item["RoleName"] for item in profile.get("Roles", [])]:
        return role, Step(PROFILE, names.profile, UPDATE, f"lacks role {names.role}")
    return role, Step(PROFILE, names.profile, UNCHANGED, f"exists, holds role {names.role}")


def _plan_security_group(
    aws: Aws, names: Names, vpc_id: str, cidr: str, ports: tuple[tuple[int, str], ...]
) -> Step:
    group = _find_security_group(aws, names, vpc_id)
    extra, missing = _rule_changes(group, cidr, ports)
    opened = f"{_ports_text(ports)} from {cidr}"
    if group is None:
        return Step(SECURITY_GROUP, names.security_group, CREATE, opened)
    if extra or missing:
        changes = [f"close {_rule_text(r)}" for r, _ in extra]
        changes += [f"open {_rule_text(r)}" for r, _ in missing]
        return Step(SECURITY_GROUP, group["GroupId"], UPDATE, "; ".join(changes))
    return Step(SECURITY_GROUP, group["GroupId"], UNCHANGED, opened)


def _plan_key_pair(aws: Aws, names: Names, public_key: str) -> Step:
    existing = aws.key_pair(names.key_pair)
    _check_key_pair(existing, public_key, names.key_pair)
    if existing is None:
        return Step(KEY_PAIR, names.key_pair, CREATE, "from " + public_key.split()[0] + " key")
    return Step(KEY_PAIR, names.key_pair, UNCHANGED, "exists with the same public key")


def _plan_instance(aws: Aws, settings: Settings, image: dict[str, Any]) -> tuple[Step, Step]:
    instance = _find_instance(aws, settings)
    address = _find_address(aws, settings)
    if instance is None:
        why = f"{settings.instance_type}, {image['ImageId']}, {settings.volume_size} GiB encrypted"
        step = Step(INSTANCE, "(new)", CREATE, why)
    elif instance["State"]["Name"] in {"stopped", "stopping"}:
        step = Step(INSTANCE, instance["InstanceId"], UPDATE, "stopped: will start it")
    else:
        why = _instance_drift(instance, settings) or instance["State"]["Name"]
        step = Step(INSTANCE, instance["InstanceId"], UNCHANGED, why)
    if address is None:
        return step, Step(ADDRESS, "(new)", CREATE, "stable public address for the instance")
    if instance is None or address.get("InstanceId") != instance["InstanceId"]:
        return step, Step(ADDRESS, address["PublicIp"], UPDATE, "associate with the instance")
    return step, Step(ADDRESS, address["PublicIp"], UNCHANGED, f"on {instance['InstanceId']}")


# apply


def apply(
    plan: Plan,
    aws: Aws,
    *,
    sleep: Callable[[float], None] = time.sleep,
    timeout: float = 300.0,
    interval: float = 5.0,
) -> Result:
    """Create what is missing, fix what drifted, wait for SSH, print a summary.

    Every step finds its resource again rather than trusting the plan, so the
    same call completes a stack that an earlier run left half-made.
    ``timeout`` bounds each wait (instance running, SSH answering).
    """
    settings, names = plan.settings, plan.names
    outcomes = []

    with phase(BUCKET):
        outcomes.append(_apply_bucket(plan, aws))
        note(outcomes[-1].action)
    with phase("instance role and profile"):
        outcomes += _apply_iam(plan, aws)
        note(", ".join(f"{o.resource} {o.action}" for o in outcomes[-2:]))
    with phase(SECURITY_GROUP):
        outcomes.append(_apply_security_group(plan, aws))
        group_id = outcomes[-1].name
        note(outcomes[-1].action)
    with phase(KEY_PAIR):
        outcomes.append(_apply_key_pair(plan, aws))
        note(outcomes[-1].action)
    with phase(INSTANCE):
        outcomes.append(_apply_instance(plan, aws, group_id, sleep))
        instance_id = outcomes[-1].name
        note(outcomes[-1].action)

    attempts = max(1, math.ceil(timeout / interval))
    _wait(
        f"waiting for {instance_id} to run",
        lambda: _running(aws, instance_id),
        sleep=sleep,
        interval=interval,
        attempts=attempts,
        failure=OpsError(
            f"instance {instance_id} did not reach 'running' within {timeout:.0f}s",
            hint="see its state in the EC2 console, then run provision again",
        ),
    )

    with phase(ADDRESS):
        outcomes.append(_apply_address(plan, aws, instance_id))
        public_address = outcomes[-1].name
        note(outcomes[-1].action)

    user, host, port = ssh_address(settings, public_address)
    _wait(
        f"waiting for SSH on {host}:{port}",
        lambda: ssh_answers(host, port),
        sleep=sleep,
        interval=interval,
        attempts=attempts,
        failure=OpsError(
            f"SSH on {host}:{port} did not answer within {timeout:.0f}s",
            hint=f"check that {settings.allowed_cidr} contains your address, then run provision "
            "again; it resumes where it stopped",
        ),
    )

    result = Result(
        stack=settings.stack,
        region=plan.region,
        outcomes=tuple(outcomes),
        instance_id=instance_id,
        public_address=public_address,
        ssh=f"{user}@{host}:{port}",
    )
    _verify(settings, aws.fresh(), names, result)
    result.show()
    return result


def _apply_bucket(plan: Plan, aws: Aws) -> Outcome:
    settings, bucket = plan.settings, plan.names.bucket
    created = not aws.bucket_exists(bucket)
    if created:
        aws.create_bucket(bucket)
    elif not _bucket_is_ours(aws, settings, plan.names):
        return Outcome(BUCKET, bucket, UNCHANGED, "not made by this stack: used as it is")
    fixed = []
    for name, ok, fix in _bucket_settings(aws, bucket, settings.tags):
        if not ok():
            fix()
            fixed.append(name)
    if created:
        return Outcome(BUCKET, bucket, CREATED, "private, encrypted (SSE-S3), versioned")
    if fixed:
        return Outcome(BUCKET, bucket, UPDATED, "set " + ", ".join(fixed))
    return Outcome(BUCKET, bucket, UNCHANGED)


def _apply_iam(plan: Plan, aws: Aws) -> list[Outcome]:
    names, tags = plan.names, plan.settings.tags
    document = json.dumps(plan.policy)

    role = aws.role(names.role)
    if role is None:
        aws.create_role(
            names.role, _trust_policy(), f"mlflow-ops stack {plan.settings.stack}", tags
        )
        aws.put_role_policy(names.role, _POLICY_NAME, document)
        role_outcome = Outcome(ROLE, names.role, CREATED, "S3 access to artifacts/ and backups/")
    else:
        changes = []
        if not tags.items() <= tag_dict(role.get("Tags")).items():
            aws.tag_role(names.role, tags)
            changes.append("tagged")
        if aws.role_policy(names.role, _POLICY_NAME) != plan.policy:
            aws.put_role_policy(names.role, _POLICY_NAME, document)
            changes.append("policy rewritten from the template")
        action = UPDATED if changes else UNCHANGED
        role_outcome = Outcome(ROLE, names.role, action, ", ".join(changes))

    profile = aws.instance_profile(names.profile)
    if profile is None:
        aws.create_instance_profile(names.profile, tags)
        aws.add_role_to_instance_profile(names.profile, names.role)
        return [role_outcome, Outcome(PROFILE, names.profile, CREATED)]
    if names.role not in [item["RoleName"] for item in profile.get("Roles", [])]:
        aws.add_role_to_instance_profile(names.profile, names.role)
        return [role_outcome, Outcome(PROFILE, names.profile, UPDATED, "role added")]
    return [role_outcome, Outcome(PROFILE, names.profile, UNCHANGED)]


def _apply_security_group(plan: Plan, aws: Aws) -> Outcome:
    settings, names = plan.settings, plan.names
    cidr, _ = _allowed_cidr(settings)
    group = _find_security_group(aws, names, plan.vpc_id)
    created = group is None
    if group is None:
        group_id = aws.create_security_group(
            names.security_group,
            f"mlflow-ops stack {settings.stack}: SSH and HTTPS from the allowed range",
            plan.vpc_id,
            _ec2_tags(settings),
        )
    else:
        group_id = group["GroupId"]
    ports = open_ports(settings)
    opened = f"{_ports_text(ports)} from {cidr}"
    extra, missing = _rule_changes(group, cidr, ports)
    if extra:
        aws.revoke_ingress(group_id, [permission for _, permission in extra])
    if missing:
        aws.authorize_ingress(group_id, [permission for _, permission in missing])
    if created:
        return Outcome(SECURITY_GROUP, group_id, CREATED, opened)
    if extra or missing:
        changes = [f"closed {_rule_text(r)}" for r, _ in extra]
        changes += [f"opened {_rule_text(r)}" for r, _ in missing]
        return Outcome(SECURITY_GROUP, group_id, UPDATED, "; ".join(changes))
    return Outcome(SECURITY_GROUP, group_id, UNCHANGED, opened)


def _apply_key_pair(plan: Plan, aws: Aws) -> Outcome:
    name = plan.names.key_pair
    existing = aws.key_pair(name)
    _check_key_pair(existing, plan.public_key, name)
    if existing is None:
        aws.import_key_pair(name, plan.public_key, _ec2_tags(plan.settings))
        return Outcome(KEY_PAIR, name, CREATED, plan.public_key.split()[0])
    return Outcome(KEY_PAIR, name, UNCHANGED)


def _profile_not_ready(exc: BaseException) -> bool:
    # A new instance profile takes a few seconds to reach EC2; until then
    # RunInstances calls its name invalid.
    return (
        isinstance(exc, AwsError)
        and exc.code == "InvalidParameterValue"
        and "iaminstanceprofile" in exc.message.lower()
    )


def _apply_instance(plan: Plan, aws: Aws, group_id: str, sleep: Callable[[float], None]) -> Outcome:
    settings = plan.settings
    instance = _find_instance(aws, settings)
    if instance is not None:
        instance_id, state = instance["InstanceId"], instance["State"]["Name"]
        if state == "stopping":
            _wait(
                f"waiting for {instance_id} to stop before starting it",
                lambda: _state(aws, instance_id) == "stopped",
                sleep=sleep,
                interval=5.0,
                attempts=60,
                failure=OpsError(f"instance {instance_id} is stuck stopping"),
            )
            state = "stopped"
        if state == "stopped":
            aws.start_instance(instance_id)
            return Outcome(INSTANCE, instance_id, UPDATED, "was stopped: started it")
        return Outcome(INSTANCE, instance_id, UNCHANGED, _instance_drift(instance, settings))

    # TagSpecifications tag the instance in the same call that makes it: an
    # instance is never seen untagged, so a rerun cannot start a second one.
    tags = [
        {
            "ResourceType": kind,
            "Tags": [{"Key": k, "Value": v} for k, v in _ec2_tags(settings).items()],
        }
        for kind in ("instance", "volume", "network-interface")
    ]
    params = {
        "ImageId": plan.image_id,
        "InstanceType": settings.instance_type,
        "KeyName": plan.names.key_pair,
        "SecurityGroupIds": [group_id],
        "IamInstanceProfile": {"Name": plan.names.profile},
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "BlockDeviceMappings": [
            {
                "DeviceName": plan.root_device,
                "Ebs": {
                    "VolumeSize": settings.volume_size,
                    "VolumeType": "gp3",
                    "Encrypted": True,
                    "DeleteOnTermination": True,
                },
            }
        ],
        "TagSpecifications": tags,
    }
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_profile_not_ready),
        stop=tenacity.stop_after_attempt(12),
        wait=tenacity.wait_fixed(5),
        sleep=sleep,
        reraise=True,
    )
    instance = retrying(aws.run_instance, **params)
    detail = f"{settings.instance_type}, {plan.image_id}, {settings.volume_size} GiB encrypted gp3"
    return Outcome(INSTANCE, instance["InstanceId"], CREATED, detail)


def _state(aws: Aws, instance_id: str) -> str | None:
    instance = aws.instance(instance_id)
    return instance["State"]["Name"] if instance else None


def _running(aws: Aws, instance_id: str) -> bool:
    instance = aws.instance(instance_id)
    # Right after RunInstances, EC2 may not list the instance yet: keep waiting.
    if instance is None:
        return False
    state = instance["State"]["Name"]
    if state in {"shutting-down", "terminated"}:
        reason = instance.get("StateReason", {}).get("Message", "no reason given")
        raise OpsError(
            f"instance {instance_id} is {state}: {reason}",
            hint="often a capacity or quota limit: try another instance type or region",
        )
    return state == "running"


def _apply_address(plan: Plan, aws: Aws, instance_id: str) -> Outcome:
    address = _find_address(aws, plan.settings)
    created = address is None
    if address is None:
        address = aws.allocate_address(_ec2_tags(plan.settings))
    ip = address["PublicIp"]
    if address.get("InstanceId") == instance_id:
        return Outcome(ADDRESS, ip, UNCHANGED, f"on {instance_id}")
    aws.associate_address(address["AllocationId"], instance_id)
    return Outcome(ADDRESS, ip, CREATED if created else UPDATED, f"associated with {instance_id}")


def ssh_answers(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether an SSH server answers at ``host:port`` with its ``SSH-`` banner."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return sock.recv(256).startswith(b"SSH-")
    except OSError:
        return False


def _wait(
    title: str,
    check: Callable[[], bool],
    *,
    sleep: Callable[[float], None],
    interval: float,
    attempts: int,
    failure: OpsError,
) -> None:
    """Call ``check`` until it is true, with a progress bar; raise ``failure`` if it never is."""
    started = time.monotonic()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(title, total=attempts)
        for _ in range(attempts):
            if check():
                break
            progress.advance(task)
            sleep(interval)
        else:
            console.print(f"[red]✗[/red] {title}")
            raise failure
    console.print(f"[green]✓[/green] {title} [dim]({time.monotonic() - started:.1f}s)[/dim]")


def _verify(settings: Settings, aws: Aws, names: Names, result: Result) -> None:
    """Check from a fresh session that the stack is what apply says it made."""
    state = describe(settings, aws)
    problems = []
    if state.instance_id != result.instance_id or state.instance_state != "running":
        problems.append(f"instance {state.instance_id} is {state.instance_state}")
    if state.public_address != result.public_address:
        problems.append(f"the Elastic IP is {state.public_address}")
    if not state.bucket_exists:
        problems.append(f"bucket {names.bucket} is missing")
    if problems:
        raise OpsError(
            f"stack {settings.stack} is not as provisioned: {'; '.join(problems)}",
            hint="someone may be changing it at the same time; run provision again",
        )


def provision(
    settings: Settings,
    *,
    dry_run: bool = False,
    aws: Aws | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Plan | Result:
    """Plan the stack, print the plan, and apply it unless ``dry_run``."""
    aws = aws or Aws.connect(settings)
    the_plan = plan(settings, aws)
    if the_plan.changes or dry_run:  # else the summary after it says all there is
        the_plan.show()
    if dry_run:
        console.print("dry run: nothing was created or changed")
        return the_plan
    return apply(the_plan, aws, sleep=sleep)


# describe


def describe(settings: Settings, aws: Aws | None = None) -> StackState:
    """Find the stack's instance, address, bucket and security group (four reads)."""
    aws = aws or Aws.connect(settings)
    names = stack_names(settings, aws.account_id, aws.region)
    instance = _find_instance(aws, settings)
    address = _find_address(aws, settings)
    groups = aws.security_groups(names.security_group, tags=settings.tags)
    return StackState(
        stack=settings.stack,
        region=aws.region,
        instance_id=instance["InstanceId"] if instance else None,
        instance_state=instance["State"]["Name"] if instance else None,
        public_address=address["PublicIp"] if address else None,
        bucket=names.bucket,
        bucket_exists=aws.bucket_exists(names.bucket),
        security_group_id=groups[0]["GroupId"] if groups else None,
    )


# destroy


def destroy(
    settings: Settings,
    aws: Aws | None = None,
    *,
    delete_data: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    timeout: float = 600.0,
    interval: float = 5.0,
) -> Result:
    """Remove the stack's resources; keep the bucket and its data unless ``delete_data``.

    Asks nothing: confirming is the task's job.
    """
    aws = aws or Aws.connect(settings)
    names = stack_names(settings, aws.account_id, aws.region)
    outcomes = []

    with phase(INSTANCE):
        outcomes.append(_destroy_instances(aws, settings, sleep, timeout, interval))
        note(outcomes[-1].action)
    with phase(ADDRESS):
        outcomes.append(_destroy_addresses(aws, settings))
        note(outcomes[-1].action)
    with phase(KEY_PAIR):
        if aws.key_pair(names.key_pair):
            aws.delete_key_pair(names.key_pair)
            outcomes.append(Outcome(KEY_PAIR, names.key_pair, REMOVED))
        else:
            outcomes.append(Outcome(KEY_PAIR, names.key_pair, ABSENT))
        note(outcomes[-1].action)
    with phase(SECURITY_GROUP):
        outcomes.append(_destroy_security_group(aws, settings, names, sleep))
        note(outcomes[-1].action)
    with phase("instance role and profile"):
        outcomes += _destroy_iam(aws, names)
        note(", ".join(f"{o.resource} {o.action}" for o in outcomes[-2:]))
    with phase(BUCKET):
        outcomes.append(_destroy_bucket(aws, settings, names, delete_data))
        note(outcomes[-1].action)
    with phase(SECRETS):
        outcomes.append(_destroy_secrets(aws, settings, delete_data))
        note(outcomes[-1].action)

    result = Result(stack=settings.stack, region=aws.region, outcomes=tuple(outcomes))
    if not result.of(REMOVED):
        console.print(f"nothing to remove: stack {settings.stack} has no resources in {aws.region}")
    result.show()
    return result


def _destroy_instances(
    aws: Aws, settings: Settings, sleep: Callable[[float], None], timeout: float, interval: float
) -> Outcome:
    # Every tagged instance goes, even extras that apply would refuse to pick from.
    ids = [instance["InstanceId"] for instance in aws.instances(settings.tags)]
    if not ids:
        return Outcome(INSTANCE, "-", ABSENT)
    aws.terminate_instances(ids)
    for instance_id in ids:
        _wait(
            f"waiting for {instance_id} to terminate",
            lambda instance_id=instance_id: _state(aws, instance_id) in {None, "terminated"},
            sleep=sleep,
            interval=interval,
            attempts=max(1, math.ceil(timeout / interval)),
            failure=OpsError(
                f"instance {instance_id} did not terminate within {timeout:.0f}s",
                hint="run destroy again; it goes on from where it stopped",
            ),
        )
    return Outcome(INSTANCE, ", ".join(ids), REMOVED, "terminated with its root volume")


def _destroy_addresses(aws: Aws, settings: Settings) -> Outcome:
    addresses = aws.addresses(settings.tags)
    if not addresses:
        return Outcome(ADDRESS, "-", ABSENT)
    for address in addresses:
        # EC2 frees an address when its instance terminates; this covers the
        # cases where it has not yet, or where it was moved to another instance.
        if address.get("AssociationId"):
            aws.disassociate_address(address["AssociationId"])
        aws.release_address(address["AllocationId"])
        # Another machine may get the address next: its host key will differ.
        hostkeys.forget(address["PublicIp"], 22)
    return Outcome(ADDRESS, ", ".join(a["PublicIp"] for a in addresses), REMOVED, "released")


def _group_in_use(exc: BaseException) -> bool:
    # The network interfaces of a terminated instance linger for a short while.
    return isinstance(exc, AwsError) and exc.code == "DependencyViolation"


def _destroy_security_group(
    aws: Aws, settings: Settings, names: Names, sleep: Callable[[float], None]
) -> Outcome:
    groups = aws.security_groups(names.security_group, tags=settings.tags)
    if not groups:
        return Outcome(SECURITY_GROUP, names.security_group, ABSENT)
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_group_in_use),
        stop=tenacity.stop_after_attempt(24),
        wait=tenacity.wait_fixed(5),
        sleep=sleep,
        reraise=True,
    )
    for group in groups:
        retrying(aws.delete_security_group, group["GroupId"])
    return Outcome(SECURITY_GROUP, ", ".join(g["GroupId"] for g in groups), REMOVED)


def _destroy_iam(aws: Aws, names: Names) -> list[Outcome]:
    outcomes = []
    profile = aws.instance_profile(names.profile)
    if profile is None:
        outcomes.append(Outcome(PROFILE, names.profile, ABSENT))
    else:
        for role in profile.get("Roles", []):
            aws.remove_role_from_instance_profile(names.profile, role["RoleName"])
        aws.delete_instance_profile(names.profile)
        outcomes.append(Outcome(PROFILE, names.profile, REMOVED))

    if aws.role(names.role) is None:
        outcomes.append(Outcome(ROLE, names.role, ABSENT))
        return outcomes
    # IAM deletes a role only once it has no policies left.
    for policy in aws.role_policy_names(names.role):
        aws.delete_role_policy(names.role, policy)
    for arn in aws.attached_policy_arns(names.role):
        aws.detach_role_policy(names.role, arn)
    aws.delete_role(names.role)
    outcomes.append(Outcome(ROLE, names.role, REMOVED, "with its policy"))
    return outcomes


def _destroy_secrets(aws: Aws, settings: Settings, delete_data: bool) -> Outcome:
    # The logins go with the data: a kept bucket's backups hold an auth
    # database whose passwords are these.
    where = logins.path(settings)
    if not delete_data:
        found = aws.parameter_names(where)
        return Outcome(SECRETS, where, KEPT if found else ABSENT, "kept with the data")
    removed = logins.forget_all(settings, aws)
    return Outcome(SECRETS, where, REMOVED if removed else ABSENT)


def _destroy_bucket(aws: Aws, settings: Settings, names: Names, delete_data: bool) -> Outcome:
    bucket = names.bucket
    if not aws.bucket_exists(bucket):
        return Outcome(BUCKET, bucket, ABSENT)
    if not _bucket_is_ours(aws, settings, names):
        return Outcome(BUCKET, bucket, KEPT, "not made by this stack")
    if not delete_data:
        return Outcome(BUCKET, bucket, KEPT, "kept with its artifacts and backups (--delete-data)")
    count = aws.empty_bucket(bucket)
    aws.delete_bucket(bucket)
    return Outcome(BUCKET, bucket, REMOVED, f"with {count} object versions and delete markers")
