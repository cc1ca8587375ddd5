"""Shared fixtures live in plugin modules, one per real part they start."""

pytest_plugins = [
    "tests.fixtures_aws",
    "tests.fixtures_sandbox",
    "tests.fixtures_mlflow",
]
