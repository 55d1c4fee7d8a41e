"""Test certificates: a root CA, an intermediate, leaves for any name, and PEM files to serve them.

Chains go root -> intermediate -> leaf, as a real CA's do, and `full_chain`
files end with the self-signed root, which Twisted 26.10's own `tls:`
endpoint loops on for ever.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.ssl import Certificate

NOW = datetime.now(timezone.utc)


def pem(*objects: Any) -> bytes:
    out = b""
    for obj in objects:
        if isinstance(obj, x509.Certificate):
            out += obj.public_bytes(Encoding.PEM)
        else:
            out += obj.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return out


Issued = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def issue(subject: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Name] | None = None, *,
          names: tuple[str, ...] = (), ca: bool = False, days: int = 30,
          key: ec.EllipticCurvePrivateKey | None = None, start: timedelta = timedelta(0)) -> Issued:
    """A certificate (self-signed when `issuer` is None) and its key (a fresh P-256 one by default),
    valid from `start` from now (an hour earlier, against clock skew) for `days`."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = cn(subject)
    signer_key, signer_name = issuer or (key, name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + start - timedelta(hours=1))
        .not_valid_after(NOW + start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return key, builder.sign(signer_key, hashes.SHA256())


def cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


CA = issue("mcpr test root", ca=True)


INTERMEDIATE = issue("mcpr test intermediate", (CA[0], CA[1].subject), ca=True)


TRUST = Certificate.loadPEM(pem(CA[1]))


def leaf(name: str, days: int = 30, start: timedelta = timedelta(0)) -> Issued:
    return issue(name, (INTERMEDIATE[0], INTERMEDIATE[1].subject), names=(name,), days=days, start=start)


def write(directory: Path, filename: str, content: bytes) -> None:
    """Atomically (write, then rename), as a careful deploy hook does."""
    temporary = directory / (filename + ".tmp")
    temporary.write_bytes(content)
    os.replace(temporary, directory / filename)


def full_chain(issued: Issued) -> bytes:
    """Key, leaf, intermediate and the self-signed root, all in one file."""
    return pem(issued[0], issued[1], INTERMEDIATE[1], CA[1])


def localhost_certificates(folder: Path) -> tuple[Path, Path]:
    """A relay's certificate folder for `localhost` and `*.localhost` in `folder`, and the file a
    client trusts it by (the root): (certificates, trust)."""
    certs = folder / "certs"
    certs.mkdir(parents=True)
    signer = (INTERMEDIATE[0], INTERMEDIATE[1].subject)
    write(certs, "relay.pem", full_chain(issue("localhost", signer, names=("localhost", "*.localhost"))))
    trust = folder / "root.pem"
    trust.write_bytes(pem(CA[1]))
    return certs, trust


def escape(path: Path) -> str:
    """Endpoint-string escaping, as for any Twisted endpoint."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")

