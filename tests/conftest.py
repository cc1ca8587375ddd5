"""Shared fixtures live in plugin modules, one per real part they start."""

import pytest

pytest_plugins = [
    "tests.fixtures_aws",
    "tests.fixtures_sandbox",
    "tests.fixtures_mlflow",
]


@pytest.fixture(autouse=True)
def own_config_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep every test away from the operator's own files: pinned host keys, CA files."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
