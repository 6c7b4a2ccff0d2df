"""TLS for the client port: a throwaway CA and a server certificate made with `cryptography`, and the
nats-server config block that serves them.

`dtf up --tls` makes (once, under the data dir) a CA and a certificate for the addresses it listens
on, unless given its own certificate and key; clients verify the server against the CA the context
names (or $DTF_CA). The CA key stays in the data dir (0600) so a restart can re-issue for new hosts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dtf.streams.auth import write_private

VALID_DAYS = 825
"""The longest validity clients accept for a server certificate."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(directory: Path, common_name: str = "dtf throwaway CA") -> tuple[Path, Path]:
    """A self-signed CA: (ca.pem, ca-key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca_path, write_private(directory / "ca-key.pem", _key_pem(key))


def issue(directory: Path, ca_pem: Path, ca_key_pem: Path, hosts: list[str], stem: str = "server") -> TlsFiles:
    """A server certificate for `hosts` (names or IP addresses) signed by the CA."""
    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TlsFiles(cert_path, write_private(directory / f"{stem}-key.pem", _key_pem(key)), ca_pem)


def ensure_local(directory: Path, hosts: list[str]) -> TlsFiles:
    """The data dir's CA (made once) and a fresh server certificate for `hosts`."""
    ca_pem, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    if not (ca_pem.exists() and ca_key.exists()):
        ca_pem, ca_key = make_ca(directory)
    return issue(directory, ca_pem, ca_key, hosts)


def listen_hosts(listen: str) -> list[str]:
    """The names a client may use for a server bound to `listen`."""
    hosts = ["127.0.0.1", "localhost"]
    if listen not in ("0.0.0.0", "::", "", "127.0.0.1", "localhost"):
        hosts.insert(0, listen)
    return hosts


def tls_block(files: TlsFiles) -> str:
    """nats-server's client-port TLS: clients must speak TLS; they authenticate by nkey, not by cert."""
    return (
        "tls {\n"
        f"  cert_file: {json.dumps(os.fspath(Path(files.cert).resolve()))}\n"
        f"  key_file: {json.dumps(os.fspath(Path(files.key).resolve()))}\n"
        "  timeout: 2\n"
        "}\n"
    )
