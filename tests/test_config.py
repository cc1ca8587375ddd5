"""Settings resolve in the documented order and refuse bad values early."""

import pytest
import yaml

from ops import config
from ops.errors import OpsError

DEFAULTS = yaml.safe_load(config.PROJECT_CONFIG.read_text())[config.CONFIG_KEY]


def test_invoke_yaml_holds_a_default_for_every_setting():
    assert set(DEFAULTS) == set(config.SETTINGS)
    settings = config.resolve(DEFAULTS, env={}, args={})
    assert settings.mlflow_version == "3.17.2"
    assert settings.port == 5000


def test_an_argument_beats_the_environment_which_beats_the_file():
    file_values = {**DEFAULTS, "instance_type": "from-file"}
    env = {"MLFLOW_OPS_INSTANCE_TYPE": "from-env"}
    assert config.resolve(file_values, env, {}).instance_type == "from-env"
    assert config.resolve(file_values, env, {"instance_type": "t3.large"}).instance_type == (
        "t3.large"
    )
    assert config.resolve(file_values, {}, {}).instance_type == "from-file"


def test_an_empty_environment_variable_counts_as_unset():
    settings = config.resolve(DEFAULTS, {"MLFLOW_OPS_STACK": ""}, {})
    assert settings.stack == DEFAULTS["stack"]


def test_numbers_and_mappings_from_the_environment_are_parsed():
    env = {"MLFLOW_OPS_PORT": "8080", "MLFLOW_OPS_SERVER_ENV": '{"A": "1 2"}'}
    settings = config.resolve(DEFAULTS, env, {})
    assert settings.port == 8080
    assert settings.server_env == {"A": "1 2"}


def test_a_bad_number_names_where_it_came_from():
    with pytest.raises(OpsError, match="MLFLOW_OPS_PORT"):
        config.resolve(DEFAULTS, {"MLFLOW_OPS_PORT": "five thousand"}, {})


@pytest.mark.parametrize("text, expected", [("yes", True), ("0", False), ("On", True)])
def test_booleans_are_parsed_not_taken_as_truthy_strings(text, expected):
    assert config.parse_bool(text) is expected


def test_an_unreadable_boolean_is_an_error():
    with pytest.raises(ValueError):
        config.parse_bool("sometimes")


def test_an_unknown_setting_in_the_file_is_refused():
    with pytest.raises(OpsError, match="instance_typo"):
        config.resolve({**DEFAULTS, "instance_typo": "t3.small"}, {}, {})


def test_a_required_setting_without_a_value_is_refused_with_a_hint():
    values = {**DEFAULTS, "port": None}
    with pytest.raises(OpsError, match="'port' has no value") as raised:
        config.resolve(values, {}, {})
    assert "invoke.yaml" in raised.value.hint


@pytest.mark.parametrize(
    "args, message",
    [
        ({"allowed_cidr": "10.0.0.1/8"}, "malformed CIDR"),
        ({"allowed_cidr": "not-a-cidr"}, "malformed CIDR"),
        ({"bucket": "Upper_Case"}, "invalid bucket name"),
        ({"bucket": "ab"}, "invalid bucket name"),
        ({"stack": "Prod!"}, "invalid stack name"),
        ({"ssh": "admin@host:99999"}, "malformed host"),
        ({"port": 0}, "out of range"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(args, message):
    with pytest.raises(OpsError, match=message):
        config.resolve(DEFAULTS, {}, args)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("admin@203.0.113.7", ("admin", "203.0.113.7", 22)),
        ("deploy@host.example:2222", ("deploy", "host.example", 2222)),
        ("host.example", ("admin", "host.example", 22)),
        ("root@[2001:db8::1]:2200", ("root", "2001:db8::1", 2200)),
    ],
)
def test_a_host_is_split_into_user_address_and_port(text, expected):
    assert config.parse_host(text, "admin") == expected
