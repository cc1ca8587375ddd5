"""The stack's secrets: generated once, kept in SSM Parameter Store.

Each secret is a SecureString under the stack's path, so any teammate with
AWS access to the stack can read them and nothing secret is kept in the
repository or on one laptop::

    /mlflow-ops/<stack>/admin-password   the server's admin login
    /mlflow-ops/<stack>/secret-key       signs the server's sessions
    /mlflow-ops/<stack>/users/<name>     a teammate's login

Secrets are created with the first ``deploy`` and kept by ``destroy`` unless
the data goes too: a restored auth database still matches its passwords.
"""

from __future__ import annotations

import dataclasses
import re
import secrets

import requests

from ops import tls
from ops.aws import Aws
from ops.config import Settings
from ops.errors import OpsError

ADMIN_USER = "admin"
# MLflow asks for 12 characters at least; 32 URL-safe bytes give 43.
_TOKEN_BYTES = 32


def path(settings: Settings, *names: str) -> str:
    return "/".join(["", "mlflow-ops", settings.stack, *names])


@dataclasses.dataclass(frozen=True)
class ServerSecrets:
    admin_password: str
    secret_key: str

    def __repr__(self) -> str:  # never show a secret in a traceback or a log
        return "ServerSecrets(<hidden>)"


def new_secret() -> str:
    return secrets.token_urlsafe(_TOKEN_BYTES)


def ensure(settings: Settings, aws: Aws) -> ServerSecrets:
    """Read the stack's server secrets, creating any that are missing."""
    values = {}
    for name in ("admin-password", "secret-key"):
        key = path(settings, name)
        # Store first, then read back: if a teammate's deploy stored one at
        # the same moment, both end up with the same value.
        aws.put_secret(key, new_secret(), settings.tags)
        values[name] = aws.parameter(key, decrypt=True)
    return ServerSecrets(values["admin-password"], values["secret-key"])


def read(settings: Settings, aws: Aws) -> ServerSecrets | None:
    """The stack's server secrets, or None before the first deploy made them."""
    password = aws.parameter(path(settings, "admin-password"), decrypt=True)
    key = aws.parameter(path(settings, "secret-key"), decrypt=True)
    if password is None or key is None:
        return None
    return ServerSecrets(password, key)


def user_password(settings: Settings, aws: Aws, user: str) -> str | None:
    if user == ADMIN_USER:
        return aws.parameter(path(settings, "admin-password"), decrypt=True)
    return aws.parameter(path(settings, "users", user), decrypt=True)


def store_user_password(settings: Settings, aws: Aws, user: str) -> str:
    """Generate and store a teammate's password; an existing one is kept."""
    key = path(settings, "users", user)
    aws.put_secret(key, new_secret(), settings.tags)
    return aws.parameter(key, decrypt=True)


def forget_user(settings: Settings, aws: Aws, user: str) -> None:
    key = path(settings, "users", user)
    if aws.parameter(key) is not None:
        aws.delete_parameter(key)


def forget_all(settings: Settings, aws: Aws) -> list[str]:
    """Delete every secret of the stack; returns the names deleted."""
    names = aws.parameter_names(path(settings))
    for name in names:
        aws.delete_parameter(name)
    return names


# On the server. MLflow's basic auth keeps users in its own database; these
# calls go through its REST API as the admin.

# The admin password that MLflow up to 3.16.0 created when none was given.
LEGACY_ADMIN_PASSWORD = "password1234"
PERMISSIONS = ("READ", "EDIT", "MANAGE")
_HTTP_TIMEOUT = 15


class Server:
    """A tracking server's user API, called with one login."""

    def __init__(self, url: str, user: str, password: str, verify: bool | str = True):
        self.url = url
        self.session = tls.Session()
        self.session.auth = (user, password)
        self.session.verify = verify

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            return self.session.request(
                method, f"{self.url}{path}", timeout=_HTTP_TIMEOUT, **kwargs
            )
        except requests.RequestException as exc:
            raise OpsError(f"{self.url} did not answer: {exc}") from None

    def accepts_login(self) -> bool:
        answer = self.call("GET", "/api/2.0/mlflow/users/current")
        return answer.status_code == 200

    def user_exists(self, name: str) -> bool:
        answer = self.call("GET", "/api/2.0/mlflow/users/get", params={"username": name})
        if answer.status_code == 404 or "RESOURCE_DOES_NOT_EXIST" in answer.text:
            return False
        _check(answer, f"looking up user {name}")
        return True

    def create_user(self, name: str, password: str) -> None:
        body = {"username": name, "password": password}
        _check(self.call("POST", "/api/2.0/mlflow/users/create", json=body), f"creating {name}")

    def grant(self, name: str, permission: str) -> None:
        """Give a user ``permission`` on every experiment and model, present and future."""
        for resource in ("experiment", "registered_model"):
            body = {
                "username": name,
                "resource_type": resource,
                "resource_id": "*",
                "permission": permission,
            }
            answer = self.call("POST", "/api/3.0/mlflow/users/permissions/grant", json=body)
            _check(answer, f"granting {permission} on every {resource} to {name}")

    def delete_user(self, name: str) -> None:
        body = {"username": name}
        _check(self.call("DELETE", "/api/2.0/mlflow/users/delete", json=body), f"removing {name}")

    def change_own_password(self, current: str, new: str) -> None:
        body = {"username": self.session.auth[0], "password": new, "current_password": current}
        answer = self.call("PATCH", "/api/2.0/mlflow/users/update-password", json=body)
        _check(answer, "changing the admin password")


def _check(answer: requests.Response, what: str) -> None:
    if answer.status_code >= 400:
        try:
            message = answer.json().get("message", answer.text)
        except ValueError:
            message = answer.text
        raise OpsError(f"{what} failed: {answer.status_code} {message[:200]}")


def retire_legacy_password(url: str, admin_password: str, verify: bool | str = True) -> bool:
    """Replace MLflow's old default admin password if the server still takes it.

    Returns whether it had to; raises if the old password still works after.
    """
    legacy = Server(url, ADMIN_USER, LEGACY_ADMIN_PASSWORD, verify)
    if not legacy.accepts_login():
        return False
    legacy.change_own_password(LEGACY_ADMIN_PASSWORD, admin_password)
    if legacy.accepts_login():
        raise OpsError(
            "the server still accepts MLflow's old default admin password",
            hint="change it by hand with the update-password API, then run deploy again",
        )
    return True


# For teammates: logins as shell variables, and managing users.

_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def client_env(settings: Settings, aws: Aws, url: str, user: str = ADMIN_USER) -> dict[str, str]:
    """The variables MLflow's client needs to log to the stack as ``user``.

    With the stack's self-signed certificate, it is written to a file that
    the client is told to trust (``tls.ca_file``).
    """
    variables = {"MLFLOW_TRACKING_URI": url, **server_cert_env(settings, aws)}
    if not settings.auth:
        return variables
    password = user_password(settings, aws, user)
    if password is None:
        hint = "run `invoke deploy` first" if user == ADMIN_USER else "add it: invoke users.add"
        raise OpsError(f"stack '{settings.stack}' has no login for {user!r}", hint=hint)
    return {**variables, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def _admin_server(settings: Settings, aws: Aws, url: str) -> Server:
    if not settings.auth:
        raise OpsError(
            "logins are off for this stack", hint="set auth: true and run `invoke deploy`"
        )
    secrets = read(settings, aws)
    if secrets is None:
        raise OpsError(
            f"stack '{settings.stack}' has no admin login yet", hint="run `invoke deploy`"
        )
    return Server(url, ADMIN_USER, secrets.admin_password, tls.verify_for(settings, aws))


def add_user(settings: Settings, aws: Aws, url: str, name: str, permission: str) -> None:
    """Create a teammate's login with ``permission`` on everything; the password goes to SSM.

    Nothing is left half-done: a failure removes what this call created.
    """
    if not _USER_NAME.match(name) or name == ADMIN_USER:
        raise OpsError(
            f"invalid user name {name!r}",
            hint="use letters, digits, '.', '_', '@' or '-' (not 'admin'), e.g. ada.lovelace",
        )
    permission = permission.upper()
    if permission not in PERMISSIONS:
        raise OpsError(
            f"unknown permission {permission!r}", hint=f"use one of {', '.join(PERMISSIONS)}"
        )
    server = _admin_server(settings, aws, url)
    if server.user_exists(name):
        raise OpsError(
            f"user {name!r} already exists", hint="pick another name, or remove it first"
        )

    key = path(settings, "users", name)
    if aws.parameter(key) is not None:  # left by a user removed some other way
        aws.delete_parameter(key)
    password = new_secret()
    aws.put_secret(key, password, settings.tags)
    created = False
    try:
        server.create_user(name, password)
        created = True
        server.grant(name, permission)
    except BaseException:
        if created:
            server.delete_user(name)
        aws.delete_parameter(key)
        raise


def remove_user(settings: Settings, aws: Aws, url: str, name: str) -> None:
    """Delete a teammate's login and its stored password."""
    if name == ADMIN_USER:
        raise OpsError("the admin login cannot be removed")
    server = _admin_server(settings, aws, url)
    if not server.user_exists(name):
        raise OpsError(
            f"there is no user {name!r}", hint="see the names under /mlflow-ops/STACK/users in SSM"
        )
    server.delete_user(name)
    forget_user(settings, aws, name)


# Entry points for the tasks: each finds the stack and its server first.


def client_env_for(settings: Settings, user: str = ADMIN_USER) -> dict[str, str]:
    from ops.target import locate

    aws = Aws.connect(settings)
    return client_env(settings, aws, locate(settings, aws).url, user)


def admin_login(settings: Settings, aws: Aws | None = None) -> tuple[str, str] | None:
    """The admin's user and password, or None without logins or before the first deploy."""
    if not settings.auth:
        return None
    secrets = read(settings, aws or Aws.connect(settings))
    return (ADMIN_USER, secrets.admin_password) if secrets else None


def server_cert_env(settings: Settings, aws: Aws | None) -> dict[str, str]:
    """``MLFLOW_TRACKING_SERVER_CERT_PATH`` for a stack that serves a self-signed certificate."""
    verify = tls.verify_for(settings, aws)
    return {"MLFLOW_TRACKING_SERVER_CERT_PATH": verify} if isinstance(verify, str) else {}


def login_if_any(settings: Settings) -> dict[str, str]:
    """The admin's login and the server's certificate once a deploy has made them; else nothing."""
    aws = Aws.connect(settings)
    variables = server_cert_env(settings, aws)
    found = admin_login(settings, aws)
    if found is not None:
        variables.update(MLFLOW_TRACKING_USERNAME=found[0], MLFLOW_TRACKING_PASSWORD=found[1])
    return variables


def manage_user(settings: Settings, action: str, name: str, permission: str = "EDIT") -> None:
    from ops.target import locate

    aws = Aws.connect(settings)
    url = locate(settings, aws).url
    if action == "add":
        add_user(settings, aws, url, name, permission)
    else:
        remove_user(settings, aws, url, name)
