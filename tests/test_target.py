"""Finding the stack's server from the settings, with and without AWS."""

import pytest
import yaml

from ops import config
from ops.errors import OpsError
from ops.target import Target, locate

DEFAULTS = yaml.safe_load(config.PROJECT_CONFIG.read_text())[config.CONFIG_KEY]


def settings(**args):
    return config.resolve(DEFAULTS, env={}, args=args)


def test_a_given_host_with_its_own_artifact_store_and_no_logins_needs_no_aws(monkeypatch):
    # With no credentials anywhere, any AWS call would fail this test.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a metadata service
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    target = locate(
        settings(
            ssh="deploy@10.1.2.3:2222",
            artifacts_destination="/var/lib/mlflow/artifacts",
            auth=False,
        )
    )
    assert (target.ssh_user, target.ssh_host, target.ssh_port) == ("deploy", "10.1.2.3", 2222)
    assert target.url == "https://10.1.2.3"
    assert target.artifacts_destination == "/var/lib/mlflow/artifacts"


def test_the_server_allows_its_public_address_with_and_without_the_https_port():
    target = Target("admin", "127.0.0.1", 2200, "127.0.0.1", 5000, "s3://b/artifacts",
                    public_address="203.0.113.7", https_port=8443)  # fmt: skip
    assert {"203.0.113.7", "203.0.113.7:8443", "127.0.0.1", "127.0.0.1:8443"} <= set(
        target.allowed_hosts
    )
    assert len(target.allowed_hosts) == len(set(target.allowed_hosts))


def test_the_url_is_https_and_names_the_port_only_when_it_is_not_443():
    target = Target("admin", "203.0.113.7", 22, "203.0.113.7", 5000, "s3://b/artifacts")
    assert target.url == "https://203.0.113.7"
    assert Target(**{**target.__dict__, "https_port": 8443}).url == "https://203.0.113.7:8443"


def test_a_tunnel_reaches_the_server_through_any_local_port():
    target = Target("admin", "203.0.113.7", 22, "203.0.113.7", 5000, "s3://b/artifacts")
    assert {"localhost:*", "127.0.0.1:*"} <= set(target.allowed_hosts)


def test_a_stack_without_an_instance_says_to_provision(moto_env):
    with pytest.raises(OpsError, match="no running instance") as raised:
        locate(settings(region="us-east-1"))
    assert "invoke provision" in raised.value.hint
