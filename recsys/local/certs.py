"""A private certificate authority and a server certificate for the local stack's TLS.

The embedded PostgreSQL is built without OpenSSL; PgBouncer terminates client TLS instead, with
a server certificate for ``localhost`` and ``127.0.0.1`` signed by a CA generated here. Clients
then connect with ``sslmode=verify-full`` and ``sslrootcert=<ca.pem>``, exactly as they do with
Azure's CA bundle in production. Nothing here is a production secret: the files live in the
stack's folder and the CA signs nothing else.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TlsFiles", "write_ca", "write_server_certificate", "write_tls_files"]

#: Names the local server certificate is valid for.
LOCAL_NAMES = ("localhost", "127.0.0.1")
_VALIDITY = datetime.timedelta(days=825)


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def exist(self) -> bool:
        return all(path.exists() for path in (self.ca_cert, self.ca_key, self.server_cert, self.server_key))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_ca(cert_path: Path, key_path: Path, common_name: str = "recsys local CA") -> None:
    """A self-signed CA certificate (P-256) and its key (mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)


def write_server_certificate(
    cert_path: Path, key_path: Path, *, ca_cert: Path, ca_key: Path, names: Sequence[str] = LOCAL_NAMES
) -> None:
    """A server certificate for ``names`` (DNS names or IP addresses) signed by the CA."""
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    alternative: list[x509.GeneralName] = []
    for name in names:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)


def write_tls_files(folder: Path, names: Sequence[str] = LOCAL_NAMES) -> TlsFiles:
    """The CA and server files in ``folder``, generated once and kept across restarts."""
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.pem", folder / "ca.key", folder / "server.pem", folder / "server.key")
    if not files.exist():
        write_ca(files.ca_cert, files.ca_key)
        write_server_certificate(files.server_cert, files.server_key, ca_cert=files.ca_cert,
                                 ca_key=files.ca_key, names=names)
    return files
