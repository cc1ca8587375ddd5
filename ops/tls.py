"""The server's TLS certificate: the user's own, or one self-signed for the stack.

A certificate the user gives (``tls_cert`` and ``tls_key``) is checked here,
before anything connects to the host: the key must match the certificate and
the certificate must be valid now. Without one, the first deploy generates a
self-signed certificate and keeps it in SSM Parameter Store, so every
teammate's deploy ships the same one and ``invoke client-env`` can hand it to
clients to verify the server with::

    /mlflow-ops/<stack>/tls    SecureString: the certificate, then its key (PEM)

Certificate and key share one parameter so that two deploys racing to create
them can never end up with a certificate from one and a key from the other.
The self-signed certificate names the stack's public address; a deploy that
finds the address changed (a stack destroyed and provisioned again) makes a
new one. ``invoke destroy --delete-data`` forgets it with the other secrets.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ops.aws import Aws
from ops.config import Settings, user_dir
from ops.console import note
from ops.errors import OpsError

SELF_SIGNED_DAYS = 825
# Status fails when the certificate has fewer days left than this.
MIN_DAYS_LEFT = 14
_PEM_KEY_MARK = "-----BEGIN"


@dataclasses.dataclass(frozen=True)
class Certificate:
    """A PEM certificate (with any chain after it) and its private key."""

    cert_pem: str
    key_pem: str
    self_signed: bool = False

    def __repr__(self) -> str:  # the key must never reach a log
        return f"Certificate({self.subject}, <key hidden>)"

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode())

    @property
    def subject(self) -> str:
        return self.leaf.subject.rfc4514_string()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.leaf)

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def names(self) -> list[str]:
        """The addresses and DNS names the certificate is valid for."""
        try:
            extension = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return []
        return [str(name.value) for name in extension.value]


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint as browsers and ``openssl x509 -fingerprint`` show it."""
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def days_left(cert: x509.Certificate, now: datetime.datetime | None = None) -> float:
    now = now or datetime.datetime.now(datetime.UTC)
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


def check(
    certificate: Certificate, now: datetime.datetime | None = None, source: str = "the certificate"
) -> Certificate:
    """Refuse a certificate nginx would not serve: unreadable, mismatched or out of date."""
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        cert = certificate.leaf
    except ValueError as exc:
        raise OpsError(
            f"{source} is not a PEM certificate ({exc})", hint="give a PEM file (BEGIN CERTIFICATE)"
        ) from None
    try:
        key = serialization.load_pem_private_key(certificate.key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise OpsError(
            f"the private key of {source} is unreadable ({exc})",
            hint="give an unencrypted PEM private key (BEGIN PRIVATE KEY)",
        ) from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        raise OpsError(
            f"the private key does not match {source} ({certificate.subject})",
            hint="give the key the certificate was issued for (tls_key)",
        )
    if cert.not_valid_after_utc <= now:
        raise OpsError(
            f"{source} expired on {cert.not_valid_after_utc:%Y-%m-%d} ({certificate.subject})",
            hint="renew it, or leave tls_cert and tls_key unset for a self-signed one",
        )
    if cert.not_valid_before_utc > now:
        raise OpsError(
            f"{source} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            hint="check the clock of this machine, or the certificate's dates",
        )
    return certificate


def load_given(cert_path: Path, key_path: Path) -> Certificate:
    """The user's certificate and key, read and checked."""
    texts = []
    for path in (cert_path, key_path):
        if not path.is_file():
            raise OpsError(f"{path} not found", hint="check tls_cert and tls_key")
        texts.append(path.read_text())
    return check(Certificate(*texts), source=f"certificate {cert_path}")


def generate(names: list[str], days: int = SELF_SIGNED_DAYS) -> Certificate:
    """A self-signed certificate (EC P-256) for ``names``: addresses or DNS names."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternatives: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return Certificate(cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem, True)


class Session(requests.Session):
    """A requests session that keeps to its ``verify``.

    A plain session's ``verify`` gives way to ``REQUESTS_CA_BUNDLE`` from the
    environment, which would make it distrust the stack's own certificate.
    """

    def request(self, *args, **kwargs) -> requests.Response:
        kwargs.setdefault("verify", self.verify)
        return super().request(*args, **kwargs)


def parameter(settings: Settings) -> str:
    return f"/mlflow-ops/{settings.stack}/tls"


def _split(stored: str) -> Certificate:
    at = stored.index(f"{_PEM_KEY_MARK} PRIVATE KEY") if "PRIVATE KEY" in stored else len(stored)
    return Certificate(stored[:at], stored[at:], self_signed=True)


def stored(settings: Settings, aws: Aws) -> Certificate | None:
    """The stack's self-signed certificate, or None before a deploy made one."""
    text = aws.parameter(parameter(settings), decrypt=True)
    return _split(text) if text else None


def ensure_self_signed(
    settings: Settings, aws: Aws, names: list[str], address: str | None = None
) -> Certificate:
    """The stack's self-signed certificate, generated and stored by the first deploy.

    A stored certificate that does not name ``address``, the stack's public
    address, is replaced: the stack was provisioned again at another one.
    """
    found = stored(settings, aws)
    if found is not None and address is not None and address not in found.names:
        note(
            f"the certificate names {', '.join(found.names)}, not {address}: making a new one "
            "(clients need `invoke client-env` again)"
        )
        aws.delete_parameter(parameter(settings))
        found = None
    if found is None:
        fresh = generate(names)
        # Store first, then read back: a teammate's deploy at the same moment
        # stores nothing, and both use the one that won.
        aws.put_secret(parameter(settings), fresh.cert_pem + fresh.key_pem, settings.tags)
        found = stored(settings, aws)
    return check(found, source=f"the stack's self-signed certificate ({parameter(settings)})")


def for_deploy(
    settings: Settings, aws: Aws | None, names: list[str], address: str | None = None
) -> Certificate:
    """The certificate the host should serve: the user's, else the stack's self-signed one."""
    if settings.tls_cert is not None and settings.tls_key is not None:
        return load_given(settings.tls_cert, settings.tls_key)
    if aws is None:
        raise OpsError(
            "a self-signed certificate is kept in SSM, and no AWS account is configured",
            hint="give tls_cert and tls_key, or AWS credentials for the stack",
        )
    return ensure_self_signed(settings, aws, names, address)


def ca_file(settings: Settings) -> Path:
    """Where ``client-env`` writes a self-signed certificate for clients to trust."""
    return user_dir() / settings.stack / "ca.pem"


def write_ca_file(settings: Settings, certificate: Certificate) -> Path:
    path = ca_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(certificate.cert_pem)
    return path


def verify_for(settings: Settings, aws: Aws | None) -> bool | str:
    """What ``requests`` should trust for the stack's server: the self-signed cert's file, or the
    system's authorities for a certificate the user gave."""
    if settings.tls_cert is not None or aws is None:
        return True
    found = stored(settings, aws)
    return str(write_ca_file(settings, found)) if found else True
