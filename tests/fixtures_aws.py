"""AWS for the tests: one moto server on loopback, reached through ``AWS_ENDPOINT_URL``.

Each test gets an environment with fake credentials and no access to the
developer's own AWS configuration, and starts from an empty moto.
"""

from __future__ import annotations

import logging
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

MOTO_ACCOUNT = "123456789012"  # the account moto answers as
DEBIAN_OWNER = "136693071363"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto server in this process, on a free loopback port; yields its URL."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto_env(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Point boto3 at an emptied moto, with fake credentials; returns the endpoint URL."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    # Without credentials botocore would ask the instance metadata service.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HOME", str(tmp_path))
    with urllib.request.urlopen(
        urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10
    ) as answer:
        assert answer.status == 200
    return moto_server


@pytest.fixture
def throwaway_key(tmp_path: Path) -> Path:
    """A fresh ed25519 key pair in tmp_path; returns the private key's path."""
    key = tmp_path / "keys" / "id_ed25519"
    key.parent.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mlflow-ops-test", "-f", str(key)],
        check=True,
    )
    return key


@pytest.fixture
def fake_ami(moto_env: str) -> str:
    """An image registered in moto, to pass as ``ami`` (what MLFLOW_OPS_AMI does)."""
    ec2 = boto3.client("ec2", region_name="us-east-1")
    return ec2.register_image(Name="debian-12-amd64-sandbox", Architecture="x86_64")["ImageId"]


@pytest.fixture
def debian_amis(moto_env: str) -> dict[str, str]:
    """Official-looking Debian 12 images in us-east-1, and the SSM parameter naming one.

    moto has neither, refuses to create a parameter under /aws/, and registers
    images under its own account only, so this writes moto's in-process state
    directly. The parameter deliberately names the older amd64 image, so a test
    can tell the parameter from the newest-image fallback (which arm64 uses).
    """
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami
    from moto.ssm.models import Parameter, ssm_backends

    ec2 = ec2_backends[MOTO_ACCOUNT]["us-east-1"]
    images = {
        "amd64-old": ("debian-12-amd64-20240101-1600", "x86_64", datetime(2024, 1, 1, tzinfo=UTC)),
        "amd64-new": ("debian-12-amd64-20240601-1700", "x86_64", datetime(2024, 6, 1, tzinfo=UTC)),
        "arm64-old": ("debian-12-arm64-20240101-1600", "arm64", datetime(2024, 1, 1, tzinfo=UTC)),
        "arm64-new": ("debian-12-arm64-20240601-1700", "arm64", datetime(2024, 6, 1, tzinfo=UTC)),
    }
    ids = {}
    for index, (label, (name, architecture, created)) in enumerate(images.items()):
        ami_id = f"ami-0deb1a{index:011x}"
        ec2.amis[ami_id] = Ami(
            ec2,
            ami_id,
            name=name,
            owner_id=DEBIAN_OWNER,
            architecture=architecture,
            creation_date=created,
            root_device_name="/dev/xvda",
            public=True,
        )
        ids[label] = ami_id

    name = "/aws/service/debian/release/12/latest/amd64"
    ssm_backends[MOTO_ACCOUNT]["us-east-1"]._parameters[name].append(
        Parameter(
            account_id=MOTO_ACCOUNT,
            name=name,
            value=ids["amd64-old"],
            parameter_type="String",
            description=None,
            allowed_pattern=None,
            keyid=None,
            last_modified_date=datetime.now(UTC),
            version=1,
            data_type="aws:ec2:image",
        )
    )
    return ids
