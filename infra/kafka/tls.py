"""The local broker's TLS material: a self-signed CA and a server certificate it signs.

`keypulse kafka start --tls` keeps them in `<data_dir>/kafka/tls/`, as PEM files the broker
reads directly (`ssl.keystore.type=PEM`, `ssl.truststore.type=PEM`):

    ca.pem       the CA certificate: the truststore, and the file clients name in
                 KEYPULSE_KAFKA_SSL_CA_FILE
    ca.key       the CA's private key (mode 0600): signs the next server certificates
    server.pem   the broker's keystore: its private key (PKCS#8, unencrypted, mode 0600),
                 its certificate, then the CA certificate

The CA lives ten years and is made once; the server certificate lives `SERVER_DAYS` and is
made again by `ensure` when it expires within `RENEW_DAYS`, when it does not name every host
it must, or when it was not signed by the CA in `ca.pem`. Clients keep trusting the same CA
across such renewals (docs/kafka-security.md: rotating the broker's certificate).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 365
RENEW_DAYS = 30
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def keystore(self) -> Path:
        return self.directory / "server.pem"


def ensure(
    directory: Path, hosts: tuple[str, ...], *, now: dt.datetime | None = None
) -> tuple[TlsFiles, bool]:
    """The CA and a server certificate valid for `hosts` (plus `DEFAULT_HOSTS`) in
    `directory`, made when missing or due; True as the second value if the server
    certificate was (re)made."""
    now = now or dt.datetime.now(dt.UTC)
    files = TlsFiles(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    if not (files.ca_cert.is_file() and files.ca_key.is_file()):
        _write_ca(files, now)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    names = tuple(dict.fromkeys((*hosts, *DEFAULT_HOSTS)))
    if server_problem(files, names, now) is None:
        return files, False
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        msg = f"{files.ca_key} is not the EC key keypulse made"
        raise TypeError(msg)
    _write_server(files, ca_cert, ca_key, names, now)
    return files, True


def server_problem(files: TlsFiles, hosts: tuple[str, ...], now: dt.datetime) -> str | None:
    """Why the server certificate in `files` must be made again, or None if it may stay."""
    try:
        blocks = files.keystore.read_bytes()
        cert = x509.load_pem_x509_certificates(blocks)[0]
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    except (OSError, ValueError):
        return "missing or unreadable"
    if cert.not_valid_after_utc - now < dt.timedelta(days=RENEW_DAYS):
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return f"not signed by {files.ca_cert}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "names no host"
    named = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    named |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    missing = [host for host in hosts if _normalise(host) not in named]
    return f"does not name {', '.join(missing)}" if missing else None


def _normalise(host: str) -> str:
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    return host.lower()


def _write_ca(files: TlsFiles, now: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keypulse local Kafka CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(files.ca_key, _pkcs8(key))
    files.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_server(
    files: TlsFiles,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: tuple[str, ...],
    now: dt.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host.lower()))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keypulse-kafka")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write_private(files.keystore, _pkcs8(key) + cert.public_bytes(pem) + ca_cert.public_bytes(pem))


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` readable by its owner only, replacing `path` in one step."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    partial.replace(path)
