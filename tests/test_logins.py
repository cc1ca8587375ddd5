"""The stack's secrets live in SSM as SecureStrings and are made only once."""

import boto3
import yaml

from ops import config, logins
from ops.aws import Aws

DEFAULTS = yaml.safe_load(config.PROJECT_CONFIG.read_text())[config.CONFIG_KEY]


def settings(**args):
    return config.resolve(DEFAULTS, env={}, args={"region": "us-east-1", **args})


def test_the_first_deploy_creates_secrets_that_later_ones_reuse(moto_env):
    stack = settings()
    first = logins.ensure(stack, Aws.connect(stack))
    again = logins.ensure(stack, Aws.connect(stack))
    assert first == again
    assert len(first.admin_password) >= 24 and first.admin_password != first.secret_key


def test_secrets_are_secure_strings_tagged_with_the_stack(moto_env):
    stack = settings(stack="dev")
    logins.ensure(stack, Aws.connect(stack))
    ssm = boto3.client("ssm", region_name="us-east-1")
    found = ssm.get_parameters_by_path(Path="/mlflow-ops/dev", Recursive=True)["Parameters"]
    assert {p["Name"] for p in found} == {
        "/mlflow-ops/dev/admin-password",
        "/mlflow-ops/dev/secret-key",
    }
    assert {p["Type"] for p in found} == {"SecureString"}
    tags = ssm.list_tags_for_resource(
        ResourceType="Parameter", ResourceId="/mlflow-ops/dev/admin-password"
    )["TagList"]
    assert {"Key": config.STACK_TAG, "Value": "dev"} in tags


def test_two_stacks_have_their_own_secrets(moto_env):
    dev, prod = settings(stack="dev"), settings(stack="prod")
    assert logins.ensure(dev, Aws.connect(dev)) != logins.ensure(prod, Aws.connect(prod))


def test_a_teammate_gets_a_password_of_their_own_until_forgotten(moto_env):
    stack = settings()
    aws = Aws.connect(stack)
    password = logins.store_user_password(stack, aws, "ada")
    assert logins.user_password(stack, aws, "ada") == password
    logins.forget_user(stack, aws, "ada")
    assert logins.user_password(stack, aws, "ada") is None


def test_the_secrets_never_show_in_a_repr(moto_env):
    stack = settings()
    made = logins.ensure(stack, Aws.connect(stack))
    assert made.admin_password not in repr(made)
