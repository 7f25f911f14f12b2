"""``splitkd-cloud certs``: a development CA, a server certificate and device certificates.

For a laptop, a testbed or a first fleet: production deployments should
issue certificates from their own PKI. Keys are ECDSA P-256 (small and fast
on a Raspberry Pi), every file is PEM, private keys are written mode 0600.
Running the command again reuses the CA in the folder, so devices added
later are trusted by the same server.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitkd import names as known_names
from splitkd.errors import SplitKDError

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
# Development lifetimes: long enough for a testbed, short enough to be replaced.
CA_DAYS = 5 * 365
LEAF_DAYS = 825  # the longest lifetime browsers and most TLS stacks still accept


def device_files(name: str) -> tuple[str, str]:
    return f"device-{name}.pem", f"device-{name}-key.pem"


@dataclass
class CertsResult:
    out: Path
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # An hour of slack for device clocks that run behind (a Pi has no RTC).
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


class DevelopmentCA:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def create(cls, name: str = "splitkd development CA") -> DevelopmentCA:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(name, issuer, key.public_key(), CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> DevelopmentCA:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise SplitKDError(f"cannot load the CA in {cert_path.parent}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SplitKDError(f"{key_path} is not an EC key made by 'splitkd-cloud certs'")
        return cls(key, cert)

    def issue(
        self, common_name: str, *, hosts: tuple[str, ...] = (), client: bool = False
    ) -> tuple[bytes, bytes]:
        """A leaf certificate and its key, both PEM: a server's for ``hosts``, or a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(common_name, self.cert.subject, key.public_key(), LEAF_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_certs(
    out: Path, *, devices: tuple[str, ...] = (), hosts: tuple[str, ...] = ()
) -> CertsResult:
    """Write (or reuse) the CA, write the server certificate and one certificate per device.

    The server certificate is kept when it exists and no ``hosts`` are given,
    so adding a device later does not replace the server's.
    """
    for name in devices:
        if not known_names.is_device_id(name):
            raise SplitKDError(
                f"device name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
            )
    out.mkdir(parents=True, exist_ok=True)
    result = CertsResult(out)
    ca_cert, ca_key = out / CA_CERT, out / CA_KEY
    if ca_cert.exists() and ca_key.exists():
        ca = DevelopmentCA.load(ca_cert, ca_key)
        result.kept.append(ca_cert)
    else:
        ca = DevelopmentCA.create()
        _write(ca_key, _key_pem(ca.key), private=True)
        _write(ca_cert, ca.cert.public_bytes(serialization.Encoding.PEM), private=False)
        result.written.append(ca_cert)
    server_cert, server_key = out / SERVER_CERT, out / SERVER_KEY
    if hosts or not (server_cert.exists() and server_key.exists()):
        names = tuple(dict.fromkeys((*DEFAULT_HOSTS, *hosts)))
        cert_pem, key_pem = ca.issue(names[0] if not hosts else hosts[0], hosts=names)
        _write(server_key, key_pem, private=True)
        _write(server_cert, cert_pem, private=False)
        result.written.append(server_cert)
    else:
        result.kept.append(server_cert)
    for name in devices:
        cert_name, key_name = device_files(name)
        cert_pem, key_pem = ca.issue(name, client=True)
        _write(out / key_name, key_pem, private=True)
        _write(out / cert_name, cert_pem, private=False)
        result.written.append(out / cert_name)
    return result
