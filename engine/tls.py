"""TLS contexts and address allow-lists for every listener and destination (BCP 195; DICOM PS3.15 B.1).

Key passwords come from the environment (`${NAME}` in channels.yaml) or a file; they are read here, handed to
OpenSSL and never logged or kept beyond the context.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Iterable

from engine.config import TlsClient, TlsKeyPair, TlsServer
from engine.errors import ConfigError


def _password(pair: TlsKeyPair) -> str | None:
    if pair.key_password is not None:
        return pair.key_password.get_secret_value()
    if pair.key_password_file is not None:
        return Path(pair.key_password_file).read_text(encoding="utf-8").rstrip("\r\n")
    return None


def _load_pair(context: ssl.SSLContext, pair: TlsKeyPair) -> None:
    if pair.cert is None or pair.key is None:
        return
    try:
        context.load_cert_chain(pair.cert, pair.key, password=_password(pair))
    except (ssl.SSLError, OSError) as exc:
        # the reason only (wrong password, key not matching the certificate): never the password itself
        raise ConfigError([f"{pair.cert}: cannot load the certificate and key: {getattr(exc, 'reason', None) or exc}"]) from None


def _hardened(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def server_context(settings: TlsServer) -> ssl.SSLContext:
    """A listener's context: its own certificate; client certificates checked against `ca` when asked for."""
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_pair(context, settings)
    if settings.ca is not None:
        context.load_verify_locations(cafile=settings.ca)
    context.verify_mode = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
                           "none": ssl.CERT_NONE}[settings.client_certificate]
    return context


def client_context(settings: TlsClient) -> ssl.SSLContext:
    """A destination's context: verify the server (its `ca`, else the system's), present ours for mutual TLS."""
    context = _hardened(ssl.create_default_context(cafile=settings.ca))
    _load_pair(context, settings)
    return context


def peer_subject(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The verified client certificate's subject CN (for the log), or '' without one."""
    if ssl_object is None:
        return ""
    cert = ssl_object.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return ""


def refusal_reason(exc: BaseException) -> str:
    """Why a handshake failed, in words fit for the log (no certificate contents)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or exc.__class__.__name__).replace("_", " ").lower()  # PEER_DID_NOT_RETURN_A_CERTIFICATE
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return exc.__class__.__name__


class AddressList:
    """An IP allow-list: addresses and networks; empty allows everyone."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in entries]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def allows(self, host: str) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
        return any(address in network for network in self.networks)
