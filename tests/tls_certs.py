"""Throwaway PKI for TLS tests, made in the test's temporary directory (never committed): a CA, the engine's
server certificate, a client certificate it signed, and a client certificate from a CA nobody trusts."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID



@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path  # encrypted with `password`
    password: str
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key))
        return context

    def server_context(self) -> ssl.SSLContext:
        """For a peer playing the HIS: the server certificate; clients must show one the CA signed."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.server_cert), str(self.server_key), password=self.password)
        context.load_verify_locations(cafile=str(self.ca))
        context.verify_mode = ssl.CERT_REQUIRED
        return context


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)  # RSA: DCMTK's BCP 195 profile takes it


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    elif server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key, key_path: Path, password: str | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                  else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL
                                           if not password else serialization.PrivateFormat.PKCS8, encryption))
    key_path.chmod(0o600)


def make_pki(directory: Path, password: str = "s3cret-Pa55word") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("Test Hospital CA", ca_key, "Test Hospital CA", ca_key, ca=True)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_key, client_key, rogue_key = _key(), _key(), _key()
    _write(directory / "server.pem", _cert("swf-engine", server_key, "Test Hospital CA", ca_key, server=True),
           server_key, directory / "server.key", password)
    _write(directory / "client.pem", _cert("CT01", client_key, "Test Hospital CA", ca_key),
           client_key, directory / "client.key")
    _write(directory / "rogue.pem", _cert("CT01", rogue_key, "Rogue CA", rogue_ca_key),
           rogue_key, directory / "rogue.key")
    return Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key", password,
               directory / "client.pem", directory / "client.key", directory / "rogue.pem", directory / "rogue.key")
