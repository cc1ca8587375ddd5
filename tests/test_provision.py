"""Provisioning and destroying a stack, against the moto server (see fixtures_aws).

What moto 5.2 does not do, and how these tests cope:

- It has no Debian images and no ``/aws/service/debian/...`` SSM parameter,
  and refuses to create one: ``debian_amis`` writes both into its state.
- ``register_image`` ignores Architecture and RootDeviceName, so the
  architecture check is skipped for such images (AWS always reports it).
- ``run_instances`` accepts any instance type; ``describe_instance_types``
  does refuse unknown ones, which is what the plan relies on.
- It never answers InvalidParameterValue for a new instance profile (IAM's
  delay); a botocore ``before-call`` hook plays that answer instead.
- It deletes a security group still in use and keeps an Elastic IP associated
  with a terminated instance; AWS refuses the first and frees the second.
  destroy handles AWS's behaviour (retry, disassociate) without relying on it.
- Its addresses route nowhere, so SSH is checked on a loopback banner server
  named by ``settings.ssh``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from ops import hostkeys, logins, provision
from ops.aws import Aws, AwsError
from ops.config import PROJECT_CONFIG, STACK_TAG, Settings, resolve
from ops.errors import OpsError

FILE_VALUES = yaml.safe_load(PROJECT_CONFIG.read_text())["mlflow_ops"]
CIDR = "203.0.113.7/32"


@pytest.fixture
def ssh_banner() -> Iterator[int]:
    """A TCP server on loopback that greets like sshd; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(b"SSH-2.0-test\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def make_settings(
    moto_env: str, throwaway_key: Path, fake_ami: str, ssh_banner: int
) -> Callable[..., Settings]:
    """Settings as the tasks resolve them, with test values for the given arguments."""

    def make(**args: Any) -> Settings:
        values = {
            "stack": "test",
            "allowed_cidr": CIDR,
            "ssh_key": str(throwaway_key),
            "ami": fake_ami,
            "ssh": f"admin@127.0.0.1:{ssh_banner}",
            **args,
        }
        return resolve(file_values=FILE_VALUES, env={}, args=values)

    return make


class Sleeps(list):
    """A stand-in for time.sleep that records each wait instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def run(settings: Settings, **options: Any) -> Any:
    return provision.provision(settings, sleep=Sleeps(), **options)


def client(service: str) -> Any:
    return boto3.client(service, region_name="us-east-1")


def live_instances() -> list[dict[str, Any]]:
    pages = client("ec2").describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running", "stopped"]}]
    )["Reservations"]
    return [instance for page in pages for instance in page["Instances"]]


def stack_groups() -> list[dict[str, Any]]:
    groups = client("ec2").describe_security_groups()["SecurityGroups"]
    return [group for group in groups if group["GroupName"] != "default"]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def tags(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {item["Key"]: item["Value"] for item in items or []}


def assert_nothing_created() -> None:
    assert client("s3").list_buckets()["Buckets"] == []
    assert [r for r in client("iam").list_roles()["Roles"] if "mlflow-ops" in r["RoleName"]] == []
    assert client("iam").list_instance_profiles()["InstanceProfiles"] == []
    assert stack_groups() == []
    assert client("ec2").describe_key_pairs()["KeyPairs"] == []
    assert live_instances() == []
    assert client("ec2").describe_addresses()["Addresses"] == []


# What provision creates


def test_provision_creates_a_private_encrypted_versioned_tagged_bucket(make_settings):
    result = run(make_settings())

    bucket = "mlflow-ops-test-123456789012-us-east-1"
    assert result.action(provision.BUCKET) == provision.CREATED
    s3 = client("s3")
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert block == dict.fromkeys(
        ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"), True
    )
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    assert tags(s3.get_bucket_tagging(Bucket=bucket)["TagSet"])[STACK_TAG] == "test"


def test_instance_role_may_only_touch_the_artifact_and_backup_prefixes(make_settings):
    run(make_settings())

    iam = client("iam")
    role = "mlflow-ops-test-us-east-1"
    (name,) = iam.list_role_policies(RoleName=role)["PolicyNames"]
    document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
    statements = document["Statement"]
    actions = {action for s in statements for action in as_list(s["Action"])}
    resources = {resource for s in statements for resource in as_list(s["Resource"])}
    bucket = "mlflow-ops-test-123456789012-us-east-1"
    assert actions == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"}
    assert resources == {
        f"arn:aws:s3:::{bucket}",
        f"arn:aws:s3:::{bucket}/artifacts/*",
        f"arn:aws:s3:::{bucket}/backups/*",
    }
    (listing,) = [s for s in statements if s["Action"] == "s3:ListBucket"]
    assert listing["Condition"]["StringLike"]["s3:prefix"] == ["artifacts/*", "backups/*"]
    assert "s3:*" not in actions and "*" not in resources
    assert all(s["Effect"] == "Allow" and "NotResource" not in s for s in statements)
    assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    trust = iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [role]


def test_security_group_opens_ssh_and_https_only_to_the_allowed_cidr(make_settings):
    run(make_settings(port=5005, https_port=8443))

    (group,) = stack_groups()
    opened = {
        (rule["IpProtocol"], rule["FromPort"], rule["ToPort"], r["CidrIp"])
        for rule in group["IpPermissions"]
        for r in rule["IpRanges"]
    }
    assert opened == {("tcp", 22, 22, CIDR), ("tcp", 8443, 8443, CIDR)}  # never MLflow's 5005
    assert all(rule["Ipv6Ranges"] == [] for rule in group["IpPermissions"])
    assert "0.0.0.0/0" not in json.dumps(group["IpPermissions"])
    assert tags(group["Tags"])[STACK_TAG] == "test"
    default_vpc = client("ec2").describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])
    assert group["VpcId"] == default_vpc["Vpcs"][0]["VpcId"]


def test_instance_requires_imdsv2_and_boots_from_an_encrypted_gp3_volume(make_settings, fake_ami):
    run(make_settings(volume_size=30))

    (instance,) = live_instances()
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["ImageId"] == fake_ami
    assert instance["InstanceType"] == "t3.small"
    assert instance["KeyName"] == "mlflow-ops-test"
    assert instance["IamInstanceProfile"]["Arn"].endswith("/mlflow-ops-test-us-east-1")
    (volume,) = client("ec2").describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [instance["InstanceId"]]}]
    )["Volumes"]
    assert volume["Encrypted"] is True
    assert (volume["VolumeType"], volume["Size"]) == ("gp3", 30)
    assert tags(volume["Tags"])[STACK_TAG] == "test"


def test_elastic_ip_is_associated_and_every_resource_carries_the_stack_tag(make_settings):
    result = run(make_settings())

    ec2 = client("ec2")
    (instance,) = live_instances()
    (address,) = ec2.describe_addresses()["Addresses"]
    assert address["InstanceId"] == instance["InstanceId"]
    assert result.public_address == address["PublicIp"]
    assert result.instance_id == instance["InstanceId"]
    (key_pair,) = ec2.describe_key_pairs()["KeyPairs"]
    iam = client("iam")
    for found in (
        instance["Tags"],
        address["Tags"],
        key_pair["Tags"],
        iam.get_role(RoleName="mlflow-ops-test-us-east-1")["Role"]["Tags"],
    ):
        assert tags(found)[STACK_TAG] == "test"


def test_provision_waits_for_the_ssh_banner_and_reports_the_address(make_settings, ssh_banner):
    result = run(make_settings())

    assert result.ssh == f"admin@127.0.0.1:{ssh_banner}"
    assert provision.ssh_answers("127.0.0.1", ssh_banner)


def test_provision_prints_a_summary_table_of_each_resource(make_settings, capsys):
    run(make_settings())

    out = capsys.readouterr().out
    for resource in provision.RESOURCES:
        assert resource in out
    assert "created" in out


# Idempotence and recovery


def test_second_provision_reports_every_resource_unchanged_and_creates_no_duplicate(
    make_settings,
):
    settings = make_settings()
    run(settings)
    again = run(settings)

    assert {o.resource: o.action for o in again.outcomes} == dict.fromkeys(
        provision.RESOURCES, provision.UNCHANGED
    )
    assert not again.changed
    assert len(live_instances()) == 1
    assert len(client("ec2").describe_addresses()["Addresses"]) == 1
    assert len(stack_groups()) == 1
    assert len(client("s3").list_buckets()["Buckets"]) == 1
    assert len(client("iam").list_instance_profiles()["InstanceProfiles"]) == 1


class Interrupted(Exception):
    """Stands for a crash or a Ctrl-C in the middle of a run."""


def test_provision_interrupted_before_the_instance_completes_on_the_next_run(make_settings):
    settings = make_settings()
    aws = Aws.connect(settings)

    def crash(**_: Any) -> None:
        raise Interrupted

    aws.client("ec2").meta.events.register("before-call.ec2.RunInstances", crash)
    with pytest.raises(Interrupted):
        provision.provision(settings, aws=aws, sleep=Sleeps())
    assert live_instances() == []

    result = run(settings)

    assert [o.resource for o in result.of(provision.CREATED)] == [
        provision.INSTANCE,
        provision.ADDRESS,
    ]
    assert [o.resource for o in result.of(provision.UNCHANGED)] == list(provision.RESOURCES[:5])
    assert len(live_instances()) == 1
    assert len(stack_groups()) == 1


def test_provision_replaces_a_lost_instance_and_address_without_duplicates(make_settings):
    settings = make_settings()
    first = run(settings)
    ec2 = client("ec2")
    ec2.terminate_instances(InstanceIds=[first.instance_id])
    (address,) = ec2.describe_addresses()["Addresses"]
    ec2.disassociate_address(AssociationId=address["AssociationId"])
    ec2.release_address(AllocationId=address["AllocationId"])

    second = run(settings)

    assert second.action(provision.INSTANCE) == provision.CREATED
    assert second.action(provision.ADDRESS) == provision.CREATED
    assert second.action(provision.BUCKET) == provision.UNCHANGED
    (instance,) = live_instances()
    assert instance["InstanceId"] == second.instance_id != first.instance_id
    assert len(ec2.describe_addresses()["Addresses"]) == 1


def test_provision_starts_a_stopped_instance_instead_of_making_another(make_settings):
    settings = make_settings()
    first = run(settings)
    client("ec2").stop_instances(InstanceIds=[first.instance_id])

    second = run(settings)

    assert second.action(provision.INSTANCE) == provision.UPDATED
    assert second.instance_id == first.instance_id
    assert len(live_instances()) == 1


def refuse(aws: Aws, service: str, operation: str, code: str, message: str, times: int) -> None:
    """Make AWS answer ``operation`` with an error the first ``times`` calls, as AWS can."""
    refusals = []

    def answer(**_: Any) -> Any:
        if len(refusals) == times:
            return None
        refusals.append(code)
        http = types.SimpleNamespace(status_code=400, headers={})
        return http, {"Error": {"Code": code, "Message": message}}

    aws.client(service).meta.events.register(f"before-call.{service}.{operation}", answer)


def test_instance_profile_not_yet_visible_to_ec2_is_retried(make_settings):
    settings = make_settings()
    aws = Aws.connect(settings)
    message = (
        "Value (mlflow-ops-test-us-east-1) for parameter iamInstanceProfile.name is invalid. "
        "Invalid IAM Instance Profile name"
    )
    refuse(aws, "ec2", "RunInstances", "InvalidParameterValue", message, times=2)
    sleeps = Sleeps()

    result = provision.provision(settings, aws=aws, sleep=sleeps)

    assert result.action(provision.INSTANCE) == provision.CREATED
    assert sleeps[:2] == [5, 5]
    assert len(live_instances()) == 1


def test_changed_cidr_or_port_rewrites_the_rules_and_says_so(make_settings, capsys):
    run(make_settings())
    result = run(make_settings(allowed_cidr="198.51.100.0/24", https_port=8080))

    (outcome,) = [o for o in result.outcomes if o.resource == provision.SECURITY_GROUP]
    assert outcome.action == provision.UPDATED
    assert f"closed tcp 22 from {CIDR}" in outcome.detail
    assert "opened tcp 8080 from 198.51.100.0/24" in outcome.detail
    (group,) = stack_groups()
    opened = {
        (rule["FromPort"], r["CidrIp"]) for rule in group["IpPermissions"] for r in rule["IpRanges"]
    }
    assert opened == {(22, "198.51.100.0/24"), (8080, "198.51.100.0/24")}
    assert "update" in capsys.readouterr().out


def test_a_private_stack_opens_only_ssh_and_closes_https_when_made_private(make_settings):
    run(make_settings())
    result = run(make_settings(private=True))

    (outcome,) = [o for o in result.outcomes if o.resource == provision.SECURITY_GROUP]
    assert outcome.action == provision.UPDATED
    assert outcome.detail == f"closed tcp 443 from {CIDR}"
    (group,) = stack_groups()
    assert [rule["FromPort"] for rule in group["IpPermissions"]] == [22]


def test_two_stacks_side_by_side_do_not_see_each_other(make_settings):
    alpha = run(make_settings(stack="alpha"))
    beta = run(make_settings(stack="beta"))

    assert beta.action(provision.INSTANCE) == provision.CREATED
    assert alpha.instance_id != beta.instance_id
    assert alpha.public_address != beta.public_address
    assert len(live_instances()) == 2
    aws = Aws.connect(make_settings())
    state = provision.describe(make_settings(stack="alpha"), aws)
    assert (state.instance_id, state.public_address) == (alpha.instance_id, alpha.public_address)

    provision.destroy(make_settings(stack="alpha"), aws, sleep=Sleeps())

    state = provision.describe(make_settings(stack="beta"), aws)
    assert state.instance_id == beta.instance_id
    assert state.instance_state == "running"
    assert state.public_address == beta.public_address
    assert [g["GroupName"] for g in stack_groups()] == ["mlflow-ops-beta"]


# Dry runs and bad inputs


def test_dry_run_prints_the_plan_and_creates_nothing(make_settings, capsys):
    plan = run(make_settings(), dry_run=True)

    assert isinstance(plan, provision.Plan)
    assert [step.action for step in plan.steps] == [provision.CREATE] * len(provision.RESOURCES)
    out = capsys.readouterr().out
    assert "nothing was created" in out
    assert "mlflow-ops-test-123456789012-us-east-1" in out
    assert_nothing_created()


def test_dry_run_of_a_complete_stack_plans_no_change(make_settings):
    run(make_settings())
    plan = run(make_settings(), dry_run=True)

    assert plan.changes == []
    assert "exists" in plan.steps[0].why


def test_connect_without_credentials_says_how_to_configure_them(make_settings, monkeypatch):
    settings = make_settings()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    with pytest.raises(OpsError, match="no AWS credentials") as caught:
        run(settings)
    assert "AWS_PROFILE" in caught.value.hint
    assert_nothing_created()


def test_connect_refuses_an_unknown_region(make_settings):
    with pytest.raises(OpsError, match="unknown AWS region 'mars-north-1'") as caught:
        run(make_settings(region="mars-north-1"))
    assert "us-east-1" in caught.value.hint


def test_connect_without_a_region_asks_for_one(make_settings, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")

    with pytest.raises(OpsError, match="no AWS region") as caught:
        run(make_settings())
    assert "--region" in caught.value.hint and "AWS_REGION" in caught.value.hint


def test_connect_learns_the_account_and_region(make_settings):
    aws = Aws.connect(make_settings(region="eu-west-1"))

    assert (aws.account_id, aws.region) == ("123456789012", "eu-west-1")


def test_unknown_instance_type_is_refused_before_anything_is_created(make_settings):
    with pytest.raises(OpsError, match=r"instance type t9\.huge does not exist"):
        run(make_settings(instance_type="t9.huge"))
    assert_nothing_created()


def test_a_missing_allowed_cidr_is_refused_rather_than_opened_to_the_world(make_settings):
    settings = make_settings().replace(allowed_cidr=None)

    with pytest.raises(OpsError, match="needs the address range") as caught:
        run(settings)
    assert "/32" in caught.value.hint
    assert_nothing_created()


def test_a_malformed_cidr_is_refused_before_anything_is_created(make_settings):
    with pytest.raises(OpsError, match="malformed CIDR"):
        make_settings(allowed_cidr="203.0.113.300/32")
    with pytest.raises(OpsError, match="malformed CIDR"):
        run(make_settings().replace(allowed_cidr="203.0.113.7/16"))
    assert_nothing_created()


def test_an_invalid_bucket_name_is_refused_before_anything_is_created(make_settings):
    with pytest.raises(OpsError, match="invalid bucket name"):
        run(make_settings().replace(bucket="Not_A_Bucket"))
    assert_nothing_created()


def test_a_missing_public_key_is_refused_with_the_command_to_make_one(make_settings, throwaway_key):
    throwaway_key.with_suffix(".pub").unlink()

    with pytest.raises(OpsError, match=r"public key .*id_ed25519\.pub not found") as caught:
        run(make_settings())
    assert f"ssh-keygen -t ed25519 -f {throwaway_key}" in caught.value.hint
    assert_nothing_created()


def test_a_malformed_public_key_is_refused(make_settings, throwaway_key):
    throwaway_key.with_suffix(".pub").write_text("ssh-ed25519 not*base64 me@laptop\n")

    with pytest.raises(OpsError, match="not an OpenSSH public key"):
        run(make_settings())
    assert_nothing_created()


def test_only_the_public_key_is_read_and_its_comment_is_not_sent(make_settings, throwaway_key):
    throwaway_key.unlink()  # the private key is not needed to provision

    run(make_settings())

    (key_pair,) = client("ec2").describe_key_pairs(IncludePublicKey=True)["KeyPairs"]
    assert (
        key_pair["PublicKey"].split()[:2]
        == throwaway_key.with_suffix(".pub").read_text().split()[:2]
    )
    assert "mlflow-ops-test" not in key_pair["PublicKey"].split()[2:]


def test_an_existing_key_pair_with_another_key_is_refused_not_replaced(make_settings, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    client("ec2").import_key_pair(
        KeyName="mlflow-ops-test", PublicKeyMaterial=other.with_suffix(".pub").read_bytes()
    )

    with pytest.raises(OpsError, match="already exists with a different public key") as caught:
        run(make_settings())
    assert "delete-key-pair" in caught.value.hint
    assert client("s3").list_buckets()["Buckets"] == []


def test_an_unknown_ami_is_refused(make_settings):
    with pytest.raises(OpsError, match="image ami-0123456789abcdef0 does not exist"):
        run(make_settings(ami="ami-0123456789abcdef0"))
    assert_nothing_created()


def test_an_explicit_world_open_cidr_is_allowed_with_a_warning(make_settings, capsys):
    result = run(make_settings(allowed_cidr="0.0.0.0/0"))

    assert "warning:" in capsys.readouterr().out
    assert result.action(provision.SECURITY_GROUP) == provision.CREATED
    (group,) = stack_groups()
    assert {r["CidrIp"] for rule in group["IpPermissions"] for r in rule["IpRanges"]} == {
        "0.0.0.0/0"
    }


def test_an_ipv6_range_is_opened_as_an_ipv6_rule(make_settings):
    run(make_settings(allowed_cidr="2001:db8::/64"))

    (group,) = stack_groups()
    assert all(rule["IpRanges"] == [] for rule in group["IpPermissions"])
    assert {r["CidrIpv6"] for rule in group["IpPermissions"] for r in rule["Ipv6Ranges"]} == {
        "2001:db8::/64"
    }


def test_ssh_that_never_answers_fails_with_a_hint_after_the_timeout(make_settings):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    sleeps = Sleeps()

    with pytest.raises(OpsError, match=f"SSH on 127.0.0.1:{port} did not answer") as caught:
        provision.provision(make_settings(ssh=f"admin@127.0.0.1:{port}"), sleep=sleeps)
    assert "run provision again" in caught.value.hint
    assert sum(sleeps) == pytest.approx(300)


# The default image


def test_the_default_image_is_the_one_debians_ssm_parameter_names(make_settings, debian_amis):
    aws = Aws.connect(make_settings())
    plan = provision.plan(make_settings(ami=None), aws)

    assert plan.image_id == debian_amis["amd64-old"]
    assert plan.root_device == "/dev/xvda"


def test_without_a_parameter_the_newest_debian_image_of_the_architecture_is_used(
    make_settings, debian_amis
):
    aws = Aws.connect(make_settings())
    plan = provision.plan(make_settings(ami=None, instance_type="t4g.small"), aws)

    assert plan.image_id == debian_amis["arm64-new"]


def test_without_any_debian_image_the_user_is_asked_for_an_ami(make_settings):
    with pytest.raises(OpsError, match="no official Debian 12 amd64 image") as caught:
        run(make_settings(ami=None))
    assert "--ami" in caught.value.hint
    assert_nothing_created()


def test_an_image_of_the_wrong_architecture_is_refused(make_settings, debian_amis):
    with pytest.raises(OpsError, match="built for arm64"):
        run(make_settings(ami=debian_amis["arm64-new"]))


# describe


def test_describe_finds_nothing_before_provision(make_settings):
    state = provision.describe(make_settings())

    assert not state.exists
    assert (state.instance_id, state.public_address, state.security_group_id) == (None,) * 3
    assert state.bucket == "mlflow-ops-test-123456789012-us-east-1"
    assert state.bucket_exists is False


def test_describe_reports_where_the_stack_is(make_settings):
    result = run(make_settings())

    state = provision.describe(make_settings())

    assert state.exists
    assert state.instance_id == result.instance_id
    assert state.instance_state == "running"
    assert state.public_address == result.public_address
    assert state.bucket_exists is True
    assert state.artifacts_uri == "s3://mlflow-ops-test-123456789012-us-east-1/artifacts"
    (group,) = stack_groups()
    assert state.security_group_id == group["GroupId"]


def test_a_named_bucket_is_used_and_named_so(make_settings):
    result = run(make_settings(bucket="team-mlflow-artifacts"))

    assert result.outcomes[0].name == "team-mlflow-artifacts"
    assert provision.describe(make_settings(bucket="team-mlflow-artifacts")).bucket_exists


# destroy


def test_destroy_removes_everything_but_the_data_and_says_it_kept_it(
    make_settings, throwaway_key, capsys
):
    settings = make_settings()
    run(settings)
    logins.ensure(settings, Aws.connect(settings))  # as the first deploy does

    # The operator has reached the instance: its host key is pinned.
    address = provision.describe(settings).public_address
    known = hostkeys.known_hosts()
    known.parent.mkdir(parents=True)
    known.write_text(f"{address} {throwaway_key.with_suffix('.pub').read_text()}")

    result = provision.destroy(settings, sleep=Sleeps())

    assert address not in known.read_text()  # the next machine at this address is met as new
    assert {o.resource: o.action for o in result.outcomes} == {
        **dict.fromkeys(provision.RESOURCES, provision.REMOVED),
        provision.BUCKET: provision.KEPT,
        provision.SECRETS: provision.KEPT,
    }
    assert logins.read(settings, Aws.connect(settings)) is not None
    assert "kept" in capsys.readouterr().out
    ec2, iam = client("ec2"), client("iam")
    assert live_instances() == []
    assert ec2.describe_addresses()["Addresses"] == []
    assert ec2.describe_key_pairs()["KeyPairs"] == []
    assert stack_groups() == []
    assert iam.list_instance_profiles()["InstanceProfiles"] == []
    assert [r for r in iam.list_roles()["Roles"] if "mlflow-ops" in r["RoleName"]] == []
    assert [b["Name"] for b in client("s3").list_buckets()["Buckets"]] == [
        "mlflow-ops-test-123456789012-us-east-1"
    ]
    assert not provision.describe(settings).exists


def test_destroy_waits_for_a_security_group_still_held_by_the_old_instance(make_settings):
    settings = make_settings()
    run(settings)
    aws = Aws.connect(settings)
    message = "resource sg-1 has a dependent object"
    refuse(aws, "ec2", "DeleteSecurityGroup", "DependencyViolation", message, times=3)
    sleeps = Sleeps()

    result = provision.destroy(settings, aws, sleep=sleeps)

    assert result.action(provision.SECURITY_GROUP) == provision.REMOVED
    assert sleeps.count(5) >= 3
    assert stack_groups() == []


def test_destroy_with_delete_data_removes_the_bucket_every_version_and_the_secrets(make_settings):
    settings = make_settings()
    run(settings)
    s3, bucket = client("s3"), "mlflow-ops-test-123456789012-us-east-1"
    for body in (b"one", b"two"):
        s3.put_object(Bucket=bucket, Key="artifacts/1/model.pkl", Body=body)
    s3.put_object(Bucket=bucket, Key="backups/mlflow.db", Body=b"db")
    s3.delete_object(Bucket=bucket, Key="artifacts/1/model.pkl")

    logins.ensure(settings, Aws.connect(settings))

    result = provision.destroy(settings, delete_data=True, sleep=Sleeps())

    assert result.action(provision.BUCKET) == provision.REMOVED
    bucket_outcome = next(o for o in result.outcomes if o.resource == provision.BUCKET)
    assert "4 object versions" in bucket_outcome.detail
    assert s3.list_buckets()["Buckets"] == []
    assert result.action(provision.SECRETS) == provision.REMOVED
    assert logins.read(settings, Aws.connect(settings)) is None


def test_destroy_twice_is_fine_and_says_there_is_nothing_left(make_settings, capsys):
    settings = make_settings()
    run(settings)
    provision.destroy(settings, sleep=Sleeps())
    capsys.readouterr()

    again = provision.destroy(settings, sleep=Sleeps())

    assert not again.changed
    assert again.action(provision.INSTANCE) == provision.ABSENT
    assert again.action(provision.BUCKET) == provision.KEPT
    assert "nothing to remove" in capsys.readouterr().out


def test_destroy_of_a_stack_never_provisioned_removes_nothing(make_settings):
    result = provision.destroy(make_settings(), delete_data=True, sleep=Sleeps())

    assert {o.action for o in result.outcomes} == {provision.ABSENT}


def test_destroy_keeps_a_named_bucket_this_stack_did_not_make(make_settings):
    client("s3").create_bucket(Bucket="someone-elses-bucket")
    settings = make_settings(bucket="someone-elses-bucket")
    result = run(settings)
    assert "not made by this stack" in result.outcomes[0].detail

    result = provision.destroy(settings, delete_data=True, sleep=Sleeps())

    assert result.action(provision.BUCKET) == provision.KEPT
    assert [b["Name"] for b in client("s3").list_buckets()["Buckets"]] == ["someone-elses-bucket"]


# The S3 helpers that other modules use


def test_s3_helpers_write_list_read_and_delete_objects(make_settings, tmp_path):
    aws = Aws.connect(make_settings())
    client("s3").create_bucket(Bucket="helpers")

    aws.put_object("helpers", "backups/a.db", b"first", metadata={"sha256": "abc"})
    source = tmp_path / "b.db"
    source.write_bytes(b"second")
    aws.upload_file(source, "helpers", "backups/b.db")

    assert [o["Key"] for o in aws.list_objects("helpers", "backups/")] == [
        "backups/a.db",
        "backups/b.db",
    ]
    assert aws.head_object("helpers", "backups/a.db")["Metadata"] == {"sha256": "abc"}
    assert aws.get_object("helpers", "backups/a.db") == b"first"
    aws.download_file("helpers", "backups/b.db", tmp_path / "copy.db")
    assert (tmp_path / "copy.db").read_bytes() == b"second"
    aws.delete_object("helpers", "backups/a.db")
    assert aws.head_object("helpers", "backups/a.db") is None


def test_an_aws_error_says_what_failed_and_keeps_the_code(make_settings):
    aws = Aws.connect(make_settings())
    client("s3").create_bucket(Bucket="helpers")

    with pytest.raises(AwsError, match="reading s3://helpers/missing failed") as caught:
        aws.get_object("helpers", "missing")
    assert caught.value.code == "NoSuchKey"
    assert caught.value.hint
