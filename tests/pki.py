"""A throwaway PKI for TLS tests: a CA with server and client certificates, and a second CA nobody trusts."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imgstream.producer.embedded_broker import HOST


@dataclass(frozen=True)
class Pki:
    """Paths of a test PKI: a trusted CA with server and client certificates, and an untrusted CA."""

    directory: Path
    ca_cert: Path  # the CA clients and the mTLS front trust
    ca_key: Path
    server_cert: Path  # SAN localhost and 127.0.0.1, signed by the CA
    server_key: Path
    client_cert: Path  # signed by the CA: mutual TLS
    client_key: Path
    client_key_encrypted: Path  # the same key, PKCS#8 encrypted with client_key_password
    client_key_password: str
    wrong_host_cert: Path  # signed by the CA, but only for wrong.example: fails host name checks
    wrong_host_key: Path
    untrusted_ca_cert: Path  # a second CA nobody trusts
    untrusted_server_cert: Path  # localhost and 127.0.0.1, signed by the untrusted CA
    untrusted_server_key: Path
    untrusted_client_cert: Path  # signed by the untrusted CA: the mTLS front refuses it
    untrusted_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "imgstream tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: str | None = None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    path.chmod(0o600)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    hosts: tuple[str, ...] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    """A certificate for `key`: a self-signed CA when `issuer` is None, else a leaf signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if issuer is None:
        signer, issuer_name = key, _name(subject)
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        ca_cert, signer = issuer
        issuer_name = ca_cert.subject
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False), critical=True)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.issuer_name(issuer_name).sign(signer, hashes.SHA256())


def make_pki(directory: Path, client_key_password: str = "client-key-secret") -> Pki:
    """Generate the CAs, certificates and keys under `directory` (EC P-256: milliseconds, not seconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def save(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        paths[f"{stem}_cert"] = directory / f"{stem}.crt"
        paths[f"{stem}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{stem}_key"] = directory / f"{stem}.key"
        _write_key(paths[f"{stem}_key"], key)

    def new_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    loopback = ("localhost", HOST)
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    for prefix, ca_name in (("", "imgstream test CA"), ("untrusted_", "untrusted test CA")):
        ca_key = new_key()
        ca = _issue(ca_name, ca_key, None)
        save(f"{prefix}ca", ca, ca_key)
        for stem, subject, hosts, usage in (
            ("server", "localhost", loopback, server),
            ("client", "imgstream-client", (), client),
        ):
            key = new_key()
            save(f"{prefix}{stem}", _issue(subject, key, (ca, ca_key), hosts=hosts, usage=usage), key)
        if not prefix:
            key = new_key()
            save("wrong_host", _issue("wrong.example", key, (ca, ca_key), hosts=("wrong.example",),
                                      usage=server), key)
            encrypted = directory / "client.encrypted.key"
            _write_key(encrypted, serialization.load_pem_private_key(paths["client_key"].read_bytes(), None),
                       client_key_password)  # type: ignore[arg-type]
    paths.pop("untrusted_ca_key")
    return Pki(directory=directory, client_key_encrypted=encrypted, client_key_password=client_key_password,
               **paths)
