"""The one place that calls AWS: a thin, typed wrapper around one boto3 session.

Every method names what it does in words, so that a failure reads as "creating
the security group failed: ..." with a hint, never as a botocore traceback.
Look-ups of a single resource return ``None`` when it does not exist.

The wrapper has no endpoint logic of its own: boto3 reads ``AWS_ENDPOINT_URL``
itself, which is how the sandbox and the tests point it at a moto server.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ProfileNotFound

from ops.config import Settings
from ops.errors import OpsError

# Standard retries back off on throttling and transient errors; five attempts
# ride out a brief hiccup without hiding a real outage for minutes.
_CLIENT_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 5},
    connect_timeout=10,
    read_timeout=60,
    user_agent_extra="mlflow-ops",
)

_CREDENTIALS_HINT = (
    "configure credentials the standard way: AWS_PROFILE (and `aws sso login` or "
    "`aws configure`), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an instance role"
)

# Hints for error codes whose remedy does not depend on the call that failed.
_DENIED_HINT = "the credentials in use lack this permission; ask for it or use another profile"
_EXPIRED_HINT = "the AWS session has expired; log in again (e.g. `aws sso login`)"
_THROTTLED_HINT = "AWS is throttling requests; wait a minute and run the command again"
_HINTS_BY_CODE = {
    "AccessDenied": _DENIED_HINT,
    "AccessDeniedException": _DENIED_HINT,
    "UnauthorizedOperation": _DENIED_HINT,
    "ExpiredToken": _EXPIRED_HINT,
    "ExpiredTokenException": _EXPIRED_HINT,
    "RequestExpired": "the AWS session has expired or the clock is wrong; log in again",
    "InvalidClientTokenId": _CREDENTIALS_HINT,
    "AuthFailure": _CREDENTIALS_HINT,
    "SignatureDoesNotMatch": "the secret key does not match the access key; " + _CREDENTIALS_HINT,
    "Throttling": _THROTTLED_HINT,
    "ThrottlingException": _THROTTLED_HINT,
    "RequestLimitExceeded": _THROTTLED_HINT,
}
_RERUN_HINT = "fix the cause and run the command again; it picks up where it stopped"

_LIVE_INSTANCE_STATES = ["pending", "running", "stopping", "stopped"]


class AwsError(OpsError):
    """An AWS request that failed, with AWS's error code kept for callers that branch on it."""

    def __init__(self, message: str, hint: str | None = None, code: str = ""):
        super().__init__(message, hint)
        self.code = code


@contextlib.contextmanager
def _calling(what: str, hint: str | None = None) -> Iterator[None]:
    """Turn botocore's exceptions into an AwsError that says what was being done."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or code or str(exc)
        raise AwsError(
            f"{what} failed: {message} ({code})",
            hint=_HINTS_BY_CODE.get(code) or hint or _RERUN_HINT,
            code=code,
        ) from None
    except NoCredentialsError:
        raise AwsError(f"{what} failed: no AWS credentials", hint=_CREDENTIALS_HINT) from None
    except (BotoCoreError, Boto3Error) as exc:
        raise AwsError(
            f"{what} failed: {exc}",
            hint=hint or "check the network connection to AWS, then run the command again",
        ) from None


def tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """Tags in the list form that EC2, IAM and S3 take."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def tag_dict(tags: list[dict[str, str]] | None) -> dict[str, str]:
    """Tags from AWS's list form back into a mapping."""
    return {tag["Key"]: tag["Value"] for tag in tags or []}


@functools.cache
def _data_loader() -> Any:
    return botocore.session.get_session().get_component("data_loader")


def _session(region: str | None) -> boto3.Session:
    """A new session that shares the API models already read by this process.

    Reading a service's model costs up to half a second; sessions made later
    (a fresh look after a change, the next test) need not pay it again.
    """
    loader = _data_loader()
    core = botocore.session.get_session()
    core.register_component("data_loader", loader)
    session = boto3.Session(botocore_session=core, region_name=region)
    # boto3 appends its own folder to the search path of each new session's loader.
    loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
    return session


def _tag_filters(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"Name": f"tag:{key}", "Values": [value]} for key, value in tags.items()]


class Aws:
    """One boto3 session, its clients (made once each) and the calls the toolkit makes."""

    def __init__(self, session: boto3.Session, account_id: str):
        self.session = session
        self._account_id = account_id
        self._clients: dict[str, Any] = {}

    @classmethod
    def connect(cls, settings: Settings) -> Aws:
        """Open a session for the settings' region and check the credentials work."""
        try:
            session = _session(settings.region)
            credentials = session.get_credentials()
            regions = {
                region
                for partition in session.get_available_partitions()
                for region in session.get_available_regions("ec2", partition)
            }
        except ProfileNotFound as exc:
            raise OpsError(
                str(exc), hint="check AWS_PROFILE against `aws configure list-profiles`"
            ) from None
        except BotoCoreError as exc:
            raise OpsError(f"cannot read the AWS configuration: {exc}", _CREDENTIALS_HINT) from None
        if credentials is None:
            raise OpsError("no AWS credentials found", hint=_CREDENTIALS_HINT)
        region = session.region_name
        if not region:
            raise OpsError(
                "no AWS region given",
                hint="pass --region, set AWS_REGION, or set a region in your AWS profile",
            )
        if region not in regions:
            raise OpsError(
                f"unknown AWS region {region!r}",
                hint="use a region code such as us-east-1 or eu-west-1 "
                "(`aws ec2 describe-regions` lists them)",
            )
        aws = cls(session, account_id="")
        with _calling("checking the AWS credentials (sts get-caller-identity)", _CREDENTIALS_HINT):
            aws._account_id = aws.client("sts").get_caller_identity()["Account"]
        return aws

    @property
    def region(self) -> str:
        return str(self.session.region_name)

    @property
    def account_id(self) -> str:
        return self._account_id

    def fresh(self) -> Aws:
        """The same account and region through a new session, to re-read what was just done."""
        return Aws(_session(self.region), self.account_id)

    def client(self, service: str) -> Any:
        """The session's client for ``service``, made on first use."""
        if service not in self._clients:
            self._clients[service] = self.session.client(service, config=_CLIENT_CONFIG)
        return self._clients[service]

    def _get(self, what: str, missing: tuple[str, ...], call: Any, **params: Any) -> Any:
        """Make one read call; ``None`` when AWS answers with one of the ``missing`` codes."""
        try:
            with _calling(what):
                return call(**params)
        except AwsError as exc:
            if exc.code in missing:
                return None
            raise

    # EC2: inputs

    def instance_type(self, name: str) -> dict[str, Any] | None:
        """The description of an instance type, or None if the region has no such type."""
        found = self._get(
            f"looking up instance type {name}",
            ("InvalidInstanceType",),
            self.client("ec2").describe_instance_types,
            InstanceTypes=[name],
        )
        types = (found or {}).get("InstanceTypes", [])
        return types[0] if types else None

    def image(self, image_id: str) -> dict[str, Any] | None:
        found = self._get(
            f"looking up image {image_id}",
            ("InvalidAMIID.NotFound", "InvalidAMIID.Malformed", "InvalidAMIID.Unavailable"),
            self.client("ec2").describe_images,
            ImageIds=[image_id],
        )
        images = (found or {}).get("Images", [])
        return images[0] if images else None

    def images(self, owner: str, name_pattern: str, architecture: str) -> list[dict[str, Any]]:
        """Available images of ``owner`` whose name matches ``name_pattern``."""
        with _calling(f"looking up images named {name_pattern} of owner {owner}"):
            return self.client("ec2").describe_images(
                Owners=[owner],
                Filters=[
                    {"Name": "name", "Values": [name_pattern]},
                    {"Name": "architecture", "Values": [architecture]},
                    {"Name": "state", "Values": ["available"]},
                ],
            )["Images"]

    def parameter(self, name: str, *, decrypt: bool = False) -> str | None:
        """The value of an SSM parameter, or None if there is none of that name."""
        found = self._get(
            f"reading SSM parameter {name}",
            ("ParameterNotFound",),
            self.client("ssm").get_parameter,
            Name=name,
            WithDecryption=decrypt,
        )
        return found["Parameter"]["Value"] if found else None

    def put_secret(self, name: str, value: str, tags: Mapping[str, str]) -> bool:
        """Store a SecureString once; False when one of that name already exists."""
        try:
            with _calling(f"storing SSM parameter {name}"):
                self.client("ssm").put_parameter(
                    Name=name, Value=value, Type="SecureString", Tags=tag_list(tags)
                )
        except AwsError as exc:
            if exc.code == "ParameterAlreadyExists":
                return False
            raise
        return True

    def parameter_names(self, path: str) -> list[str]:
        """The names of the SSM parameters under ``path``, at any depth."""
        with _calling(f"listing SSM parameters under {path}"):
            pages = self.client("ssm").get_paginator("get_parameters_by_path")
            return [
                item["Name"]
                for page in pages.paginate(Path=path, Recursive=True)
                for item in page["Parameters"]
            ]

    def delete_parameter(self, name: str) -> None:
        with _calling(f"deleting SSM parameter {name}"):
            self.client("ssm").delete_parameter(Name=name)

    def default_vpc_id(self) -> str | None:
        with _calling("looking up the default VPC"):
            vpcs = self.client("ec2").describe_vpcs(
                Filters=[{"Name": "is-default", "Values": ["true"]}]
            )["Vpcs"]
        return vpcs[0]["VpcId"] if vpcs else None

    # EC2: security groups

    def security_groups(
        self, name: str, *, vpc_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Security groups named ``name``, in one VPC or carrying ``tags``."""
        filters = [{"Name": "group-name", "Values": [name]}]
        if vpc_id:
            filters.append({"Name": "vpc-id", "Values": [vpc_id]})
        filters += _tag_filters(tags or {})
        with _calling(f"looking up security group {name}"):
            return self.client("ec2").describe_security_groups(Filters=filters)["SecurityGroups"]

    def create_security_group(
        self, name: str, description: str, vpc_id: str, tags: Mapping[str, str]
    ) -> str:
        with _calling(f"creating security group {name}"):
            return self.client("ec2").create_security_group(
                GroupName=name,
                Description=description,
                VpcId=vpc_id,
                TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list(tags)}],
            )["GroupId"]

    def authorize_ingress(self, group_id: str, permissions: list[dict[str, Any]]) -> None:
        with _calling(f"opening ports in security group {group_id}"):
            self.client("ec2").authorize_security_group_ingress(
                GroupId=group_id, IpPermissions=permissions
            )

    def revoke_ingress(self, group_id: str, permissions: list[dict[str, Any]]) -> None:
        with _calling(f"closing ports in security group {group_id}"):
            self.client("ec2").revoke_security_group_ingress(
                GroupId=group_id, IpPermissions=permissions
            )

    def delete_security_group(self, group_id: str) -> None:
        with _calling(f"deleting security group {group_id}"):
            self.client("ec2").delete_security_group(GroupId=group_id)

    # EC2: key pairs

    def key_pair(self, name: str) -> dict[str, Any] | None:
        """A key pair with its public key, or None."""
        found = self._get(
            f"looking up key pair {name}",
            ("InvalidKeyPair.NotFound",),
            self.client("ec2").describe_key_pairs,
            KeyNames=[name],
            IncludePublicKey=True,
        )
        pairs = (found or {}).get("KeyPairs", [])
        return pairs[0] if pairs else None

    def import_key_pair(self, name: str, public_key: str, tags: Mapping[str, str]) -> str:
        with _calling(f"importing key pair {name}"):
            return self.client("ec2").import_key_pair(
                KeyName=name,
                PublicKeyMaterial=public_key.encode(),
                TagSpecifications=[{"ResourceType": "key-pair", "Tags": tag_list(tags)}],
            )["KeyPairId"]

    def delete_key_pair(self, name: str) -> None:
        with _calling(f"deleting key pair {name}"):
            self.client("ec2").delete_key_pair(KeyName=name)

    # EC2: instances

    def instances(self, tags: Mapping[str, str]) -> list[dict[str, Any]]:
        """Instances carrying ``tags`` that are not terminated or terminating."""
        filters = [
            *_tag_filters(tags),
            {"Name": "instance-state-name", "Values": _LIVE_INSTANCE_STATES},
        ]
        with _calling("looking up the stack's instances"):
            pages = self.client("ec2").get_paginator("describe_instances").paginate(Filters=filters)
            return [
                instance
                for page in pages
                for reservation in page["Reservations"]
                for instance in reservation["Instances"]
            ]

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        """One instance, or None while EC2 does not know it (yet, or any more)."""
        found = self._get(
            f"looking up instance {instance_id}",
            ("InvalidInstanceID.NotFound",),
            self.client("ec2").describe_instances,
            InstanceIds=[instance_id],
        )
        reservations = (found or {}).get("Reservations", [])
        return reservations[0]["Instances"][0] if reservations else None

    def run_instance(self, **params: Any) -> dict[str, Any]:
        """Start one instance; ``params`` are those of EC2's RunInstances."""
        with _calling("starting the instance", hint=_RERUN_HINT):
            return self.client("ec2").run_instances(MinCount=1, MaxCount=1, **params)["Instances"][
                0
            ]

    def start_instance(self, instance_id: str) -> None:
        with _calling(f"starting stopped instance {instance_id}"):
            self.client("ec2").start_instances(InstanceIds=[instance_id])

    def terminate_instances(self, instance_ids: list[str]) -> None:
        with _calling(f"terminating {', '.join(instance_ids)}"):
            self.client("ec2").terminate_instances(InstanceIds=instance_ids)

    def volumes(self, instance_id: str) -> list[dict[str, Any]]:
        with _calling(f"looking up the volumes of {instance_id}"):
            return self.client("ec2").describe_volumes(
                Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}]
            )["Volumes"]

    # EC2: Elastic IPs

    def addresses(self, tags: Mapping[str, str]) -> list[dict[str, Any]]:
        with _calling("looking up the stack's Elastic IPs"):
            return self.client("ec2").describe_addresses(Filters=_tag_filters(tags))["Addresses"]

    def allocate_address(self, tags: Mapping[str, str]) -> dict[str, Any]:
        with _calling("allocating an Elastic IP"):
            return self.client("ec2").allocate_address(
                Domain="vpc",
                TagSpecifications=[{"ResourceType": "elastic-ip", "Tags": tag_list(tags)}],
            )

    def associate_address(self, allocation_id: str, instance_id: str) -> None:
        with _calling(f"associating Elastic IP {allocation_id} with {instance_id}"):
            self.client("ec2").associate_address(
                AllocationId=allocation_id, InstanceId=instance_id, AllowReassociation=True
            )

    def disassociate_address(self, association_id: str) -> None:
        with _calling(f"disassociating Elastic IP ({association_id})"):
            self.client("ec2").disassociate_address(AssociationId=association_id)

    def release_address(self, allocation_id: str) -> None:
        with _calling(f"releasing Elastic IP {allocation_id}"):
            self.client("ec2").release_address(AllocationId=allocation_id)

    # IAM

    def role(self, name: str) -> dict[str, Any] | None:
        found = self._get(
            f"looking up IAM role {name}",
            ("NoSuchEntity",),
            self.client("iam").get_role,
            RoleName=name,
        )
        return found["Role"] if found else None

    def create_role(
        self, name: str, trust_policy: str, description: str, tags: Mapping[str, str]
    ) -> None:
        with _calling(f"creating IAM role {name}"):
            self.client("iam").create_role(
                RoleName=name,
                AssumeRolePolicyDocument=trust_policy,
                Description=description,
                Tags=tag_list(tags),
            )

    def tag_role(self, name: str, tags: Mapping[str, str]) -> None:
        with _calling(f"tagging IAM role {name}"):
            self.client("iam").tag_role(RoleName=name, Tags=tag_list(tags))

    def role_policy(self, role: str, policy: str) -> dict[str, Any] | None:
        """An inline policy's document, or None."""
        found = self._get(
            f"reading policy {policy} of IAM role {role}",
            ("NoSuchEntity",),
            self.client("iam").get_role_policy,
            RoleName=role,
            PolicyName=policy,
        )
        return found["PolicyDocument"] if found else None

    def role_policy_names(self, role: str) -> list[str]:
        with _calling(f"listing the policies of IAM role {role}"):
            pages = self.client("iam").get_paginator("list_role_policies").paginate(RoleName=role)
            return [name for page in pages for name in page["PolicyNames"]]

    def attached_policy_arns(self, role: str) -> list[str]:
        with _calling(f"listing the managed policies of IAM role {role}"):
            pages = (
                self.client("iam")
                .get_paginator("list_attached_role_policies")
                .paginate(RoleName=role)
            )
            return [p["PolicyArn"] for page in pages for p in page["AttachedPolicies"]]

    def put_role_policy(self, role: str, policy: str, document: str) -> None:
        with _calling(f"writing policy {policy} of IAM role {role}"):
            self.client("iam").put_role_policy(
                RoleName=role, PolicyName=policy, PolicyDocument=document
            )

    def delete_role_policy(self, role: str, policy: str) -> None:
        with _calling(f"deleting policy {policy} of IAM role {role}"):
            self.client("iam").delete_role_policy(RoleName=role, PolicyName=policy)

    def detach_role_policy(self, role: str, arn: str) -> None:
        with _calling(f"detaching {arn} from IAM role {role}"):
            self.client("iam").detach_role_policy(RoleName=role, PolicyArn=arn)

    def delete_role(self, name: str) -> None:
        with _calling(f"deleting IAM role {name}"):
            self.client("iam").delete_role(RoleName=name)

    def instance_profile(self, name: str) -> dict[str, Any] | None:
        found = self._get(
            f"looking up instance profile {name}",
            ("NoSuchEntity",),
            self.client("iam").get_instance_profile,
            InstanceProfileName=name,
        )
        return found["InstanceProfile"] if found else None

    def create_instance_profile(self, name: str, tags: Mapping[str, str]) -> None:
        with _calling(f"creating instance profile {name}"):
            self.client("iam").create_instance_profile(
                InstanceProfileName=name, Tags=tag_list(tags)
            )

    def add_role_to_instance_profile(self, profile: str, role: str) -> None:
        with _calling(f"adding IAM role {role} to instance profile {profile}"):
            self.client("iam").add_role_to_instance_profile(
                InstanceProfileName=profile, RoleName=role
            )

    def remove_role_from_instance_profile(self, profile: str, role: str) -> None:
        with _calling(f"removing IAM role {role} from instance profile {profile}"):
            self.client("iam").remove_role_from_instance_profile(
                InstanceProfileName=profile, RoleName=role
            )

    def delete_instance_profile(self, name: str) -> None:
        with _calling(f"deleting instance profile {name}"):
            self.client("iam").delete_instance_profile(InstanceProfileName=name)

    # S3: buckets

    def bucket_exists(self, bucket: str) -> bool:
        """Whether the bucket exists and is ours; a bucket of another account is an error."""
        try:
            with _calling(f"looking up bucket {bucket}"):
                self.client("s3").head_bucket(Bucket=bucket)
        except AwsError as exc:
            if exc.code in {"404", "NoSuchBucket", "NotFound"}:
                return False
            if exc.code in {"403", "AccessDenied"}:
                raise OpsError(
                    f"bucket {bucket} exists but this account cannot use it",
                    hint="bucket names are global: choose another with --bucket",
                ) from None
            raise
        return True

    def create_bucket(self, bucket: str) -> None:
        params: dict[str, Any] = {"Bucket": bucket}
        # us-east-1 is the one region that refuses an explicit location constraint.
        if self.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        with _calling(
            f"creating bucket {bucket}",
            hint="bucket names are global: choose another with --bucket",
        ):
            self.client("s3").create_bucket(**params)

    def public_access_block(self, bucket: str) -> dict[str, bool]:
        found = self._get(
            f"reading the public access block of bucket {bucket}",
            ("NoSuchPublicAccessBlockConfiguration",),
            self.client("s3").get_public_access_block,
            Bucket=bucket,
        )
        return found["PublicAccessBlockConfiguration"] if found else {}

    def block_public_access(self, bucket: str) -> None:
        with _calling(f"blocking public access to bucket {bucket}"):
            self.client("s3").put_public_access_block(
                Bucket=bucket,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
            )

    def bucket_encryption(self, bucket: str) -> list[dict[str, Any]]:
        """The bucket's default encryption rules; empty when it has none."""
        found = self._get(
            f"reading the default encryption of bucket {bucket}",
            ("ServerSideEncryptionConfigurationNotFoundError",),
            self.client("s3").get_bucket_encryption,
            Bucket=bucket,
        )
        return found["ServerSideEncryptionConfiguration"]["Rules"] if found else []

    def encrypt_bucket(self, bucket: str) -> None:
        """Encrypt new objects with S3-managed keys (SSE-S3)."""
        with _calling(f"setting default encryption of bucket {bucket}"):
            self.client("s3").put_bucket_encryption(
                Bucket=bucket,
                ServerSideEncryptionConfiguration={
                    "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
                },
            )

    def bucket_versioning(self, bucket: str) -> str | None:
        with _calling(f"reading the versioning of bucket {bucket}"):
            return self.client("s3").get_bucket_versioning(Bucket=bucket).get("Status")

    def enable_versioning(self, bucket: str) -> None:
        with _calling(f"turning on versioning of bucket {bucket}"):
            self.client("s3").put_bucket_versioning(
                Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
            )

    def bucket_tags(self, bucket: str) -> dict[str, str]:
        found = self._get(
            f"reading the tags of bucket {bucket}",
            ("NoSuchTagSet",),
            self.client("s3").get_bucket_tagging,
            Bucket=bucket,
        )
        return tag_dict(found["TagSet"]) if found else {}

    def tag_bucket(self, bucket: str, tags: Mapping[str, str]) -> None:
        """Replace the bucket's tags (S3 has no call that adds one tag)."""
        with _calling(f"tagging bucket {bucket}"):
            self.client("s3").put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag_list(tags)})

    def empty_bucket(self, bucket: str) -> int:
        """Delete every object version and delete marker; return how many there were."""
        s3 = self.client("s3")
        deleted = 0
        with _calling(f"emptying bucket {bucket}"):
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
                batch = [
                    {"Key": item["Key"], "VersionId": item["VersionId"]}
                    for item in page.get("Versions", []) + page.get("DeleteMarkers", [])
                ]
                # A page holds at most 1000 entries, which is DeleteObjects' limit too.
                if batch:
                    answer = s3.delete_objects(
                        Bucket=bucket, Delete={"Objects": batch, "Quiet": True}
                    )
                    if answer.get("Errors"):
                        first = answer["Errors"][0]
                        raise OpsError(
                            f"emptying bucket {bucket} failed on {first['Key']}: "
                            f"{first.get('Message')} ({first.get('Code')})",
                            hint=_RERUN_HINT,
                        )
                    deleted += len(batch)
        return deleted

    def delete_bucket(self, bucket: str) -> None:
        with _calling(f"deleting bucket {bucket}"):
            self.client("s3").delete_bucket(Bucket=bucket)

    # S3: objects

    def head_object(self, bucket: str, key: str) -> dict[str, Any] | None:
        """An object's metadata (size, ETag, Metadata, ...), or None if it does not exist."""
        return self._get(
            f"looking up s3://{bucket}/{key}",
            ("404", "NoSuchKey", "NotFound"),
            self.client("s3").head_object,
            Bucket=bucket,
            Key=key,
        )

    def put_object(
        self, bucket: str, key: str, body: bytes, metadata: Mapping[str, str] | None = None
    ) -> None:
        with _calling(f"writing s3://{bucket}/{key}"):
            self.client("s3").put_object(
                Bucket=bucket, Key=key, Body=body, Metadata=dict(metadata or {})
            )

    def get_object(self, bucket: str, key: str) -> bytes:
        with _calling(f"reading s3://{bucket}/{key}"):
            return self.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()

    def delete_object(self, bucket: str, key: str) -> None:
        with _calling(f"deleting s3://{bucket}/{key}"):
            self.client("s3").delete_object(Bucket=bucket, Key=key)

    def list_objects(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        """Every object under ``prefix`` (Key, Size, LastModified, ETag), in key order."""
        with _calling(f"listing s3://{bucket}/{prefix}"):
            pages = (
                self.client("s3")
                .get_paginator("list_objects_v2")
                .paginate(Bucket=bucket, Prefix=prefix)
            )
            return [item for page in pages for item in page.get("Contents", [])]

    def upload_file(self, path: Path, bucket: str, key: str) -> None:
        """Upload a file of any size (multipart when large)."""
        with _calling(f"uploading {path} to s3://{bucket}/{key}"):
            self.client("s3").upload_file(str(path), bucket, key)

    def download_file(self, bucket: str, key: str, path: Path) -> None:
        with _calling(f"downloading s3://{bucket}/{key} to {path}"):
            self.client("s3").download_file(bucket, key, str(path))
