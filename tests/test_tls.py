"""The certificate nginx serves, and the nginx site and steps a deploy writes, without a host."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509

from ops import health, host, tls
from ops.aws import Aws
from ops.config import resolve
from ops.console import console
from ops.errors import OpsError
from tests.test_host import RELEASE, facts_of, titles

NAMES = ["203.0.113.7", "mlflow.example.com", "localhost", "127.0.0.1"]


def test_a_self_signed_certificate_names_every_address_and_lasts_825_days():
    made = tls.generate(NAMES)
    names = made.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("203.0.113.7"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert names.get_values_for_type(x509.DNSName) == ["mlflow.example.com", "localhost"]
    assert 824 < tls.days_left(made.leaf) <= 825
    assert tls.check(made) is made


def test_the_fingerprint_reads_as_openssl_prints_it():
    fingerprint = tls.generate(NAMES).fingerprint
    assert len(fingerprint.split(":")) == 32
    assert fingerprint == fingerprint.upper()


def test_a_key_that_does_not_match_the_certificate_is_refused_with_a_hint(tmp_path):
    one, other = tls.generate(NAMES), tls.generate(NAMES)
    (tmp_path / "cert.pem").write_text(one.cert_pem)
    (tmp_path / "key.pem").write_text(other.key_pem)
    with pytest.raises(OpsError, match="private key does not match certificate") as raised:
        tls.load_given(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert "tls_key" in raised.value.hint


def test_an_expired_certificate_is_refused_with_its_date():
    made = tls.generate(NAMES, days=30)
    after = made.not_after + datetime.timedelta(days=1)
    with pytest.raises(OpsError, match=f"expired on {made.not_after:%Y-%m-%d}") as raised:
        tls.check(made, now=after)
    assert "renew" in raised.value.hint


def test_a_file_that_is_no_certificate_is_refused(tmp_path):
    made = tls.generate(NAMES)
    with pytest.raises(OpsError, match="not a PEM certificate"):
        tls.check(tls.Certificate("not a certificate", made.key_pem))


def test_the_key_never_shows_in_a_repr():
    made = tls.generate(NAMES)
    assert "PRIVATE" not in repr(made)
    assert "PRIVATE" not in repr(host.Release(**{**RELEASE.__dict__, "tls_key": made.key_pem}))


def test_the_first_deploy_stores_one_self_signed_certificate_that_later_ones_reuse(moto_env):
    settings = resolve(file_values=None, env={}, args={**REQUIRED, "stack": "tls"})
    aws = Aws.connect(settings)
    first = tls.ensure_self_signed(settings, aws, NAMES, NAMES[0])
    again = tls.ensure_self_signed(settings, aws, ["198.51.100.1"], NAMES[0])
    assert again.fingerprint == first.fingerprint
    assert again.key_pem == first.key_pem
    stored = aws.client("ssm").get_parameter(Name="/mlflow-ops/tls/tls")["Parameter"]
    assert stored["Type"] == "SecureString"


def test_a_stack_provisioned_again_at_another_address_gets_a_new_certificate(moto_env, capsys):
    settings = resolve(file_values=None, env={}, args={**REQUIRED, "stack": "tls"})
    aws = Aws.connect(settings)
    old = tls.ensure_self_signed(settings, aws, NAMES, NAMES[0])
    new = tls.ensure_self_signed(settings, aws, ["198.51.100.1", "localhost"], "198.51.100.1")
    assert new.fingerprint != old.fingerprint
    assert new.names == ["198.51.100.1", "localhost"]
    assert tls.stored(settings, aws).fingerprint == new.fingerprint
    assert "invoke client-env" in capsys.readouterr().out


def test_clients_are_told_to_trust_the_stored_certificate(moto_env, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    settings = resolve(file_values=None, env={}, args={**REQUIRED, "stack": "tls"})
    aws = Aws.connect(settings)
    assert tls.verify_for(settings, aws) is True  # nothing stored yet: the system's authorities
    made = tls.ensure_self_signed(settings, aws, NAMES)
    path = tls.verify_for(settings, aws)
    assert path == str(tmp_path / "mlflow-ops" / "tls" / "ca.pem")
    assert Path(path).read_text() == made.cert_pem


REQUIRED = {
    "stack": "test",
    "instance_type": "t3.small",
    "volume_size": 20,
    "ssh_user": "admin",
    "ssh_key": "/nonexistent",
    "mlflow_version": "3.17.2",
    "port": 5000,
    "https_port": 443,
    "private": False,
    "workers": 2,
    "jobs": False,
    "server_env": {},
    "backup_keep": 14,
    "backup_schedule": "daily",
    "backup_max_age_hours": 26,
    "auth": True,
    "region": "us-east-1",
}

# The host side: nginx in front of MLflow.

MADE = tls.generate(NAMES)
TLS_RELEASE = host.Release(
    **{
        **RELEASE.__dict__,
        "bind": "127.0.0.1",
        "tls_cert": MADE.cert_pem,
        "tls_key": MADE.key_pem,
        "https_port": 8443,
    }
)
SERVING = {
    "proxy": {"ActiveState": "active", "UnitFileState": "enabled"},
    "links": {host.SITE_LINK: host.SITE_PATH, host.DEFAULT_SITE_LINK: None},
    "packages": {name: True for name in TLS_RELEASE.packages},
}


def site() -> str:
    return next(f.content for f in host.managed_files(TLS_RELEASE) if f.path == host.SITE_PATH)


def directives(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line.rstrip(";") for line in lines if line.endswith(";")]


def test_nginx_terminates_tls_on_the_https_port_and_passes_requests_to_mlflow_on_loopback():
    found = directives(site())
    assert "listen 8443 ssl" in found
    assert f"ssl_certificate {host.TLS_CERT_PATH}" in found
    assert f"ssl_certificate_key {host.TLS_KEY_PATH}" in found
    assert "proxy_pass http://127.0.0.1:5000" in found
    assert "proxy_set_header Host $http_host" in found  # MLflow checks it against allowed hosts
    argv = host.server_command(TLS_RELEASE)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_nginx_neither_limits_nor_buffers_large_artifacts_nor_times_them_out_early():
    found = directives(site())
    assert "client_max_body_size 0" in found
    assert "proxy_request_buffering off" in found
    assert "proxy_buffering off" in found
    for name in ("proxy_read_timeout", "proxy_send_timeout", "client_body_timeout"):
        assert f"{name} {host.PROXY_TIMEOUT}" in found
    assert int(host.PROXY_TIMEOUT.rstrip("s")) >= 3600


def test_the_key_is_private_to_root_and_the_certificate_readable():
    modes = {f.path: f.mode for f in host.managed_files(TLS_RELEASE)}
    assert modes[host.TLS_KEY_PATH] == "0600"
    assert modes[host.TLS_CERT_PATH] == "0644"


def test_a_fresh_host_gets_nginx_with_only_the_mlflow_site():
    facts = facts_of(
        TLS_RELEASE,
        packages={"python3-venv": True, "nginx": False},
        proxy={"ActiveState": "inactive", "UnitFileState": ""},
        links={host.SITE_LINK: None, host.DEFAULT_SITE_LINK: "/etc/nginx/sites-available/default"},
    )
    steps = titles(host.plan(TLS_RELEASE, facts))
    assert steps[0] == "install nginx"
    assert steps[-3:] == ["enable the mlflow site in nginx", "enable nginx", "start nginx"]


def test_a_host_serving_the_release_over_tls_needs_nothing():
    assert host.plan(TLS_RELEASE, facts_of(TLS_RELEASE, **SERVING)) == []


def test_a_new_certificate_reloads_nginx_and_restarts_no_mlflow():
    renewed = tls.generate(NAMES)
    changed = host.Release(
        **{**TLS_RELEASE.__dict__, "tls_cert": renewed.cert_pem, "tls_key": renewed.key_pem}
    )
    assert titles(host.plan(changed, facts_of(TLS_RELEASE, **SERVING))) == [
        f"write {host.TLS_CERT_PATH}",
        f"write {host.TLS_KEY_PATH}",
        "reload nginx",
    ]


@pytest.mark.parametrize(
    ("level", "passed"), [("1.2", True), ("2.0", True), ("2.1", False), ("9.6", False)]
)
def test_the_exposure_check_passes_at_2_or_less(level, passed):
    report = (
        f"NAME  DESCRIPTION  EXPOSURE\n→ Overall exposure level for mlflow.service: {level} OK\n"
    )
    check = health.exposure_check(report)
    assert check.passed is passed
    assert check.detail.startswith(level)


def test_the_exposure_check_fails_when_systemd_gives_no_level():
    assert health.exposure_check("Unit mlflow.service not found.").passed is False


def test_a_fingerprint_prints_as_written_and_never_as_emoji():
    # rich would turn ":AB:" and ":CD:" into emoji, silently corrupting it.
    with console.capture() as captured:
        console.print("SHA-256 fingerprint: 59:AB:A9:F4:CD:6C")
    assert captured.get().strip() == "SHA-256 fingerprint: 59:AB:A9:F4:CD:6C"
