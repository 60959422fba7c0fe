"""TLS for the gRPC server and client: PEM files read and checked up front, then gRPC credentials.

    server: server_credentials(cert, key)                 TLS
            server_credentials(cert, key, client_ca)      mutual TLS: clients must show a certificate `client_ca` signed
            server_tls(cert, key, client_ca)              either, or None (plaintext) when no file is given
    client: channel_credentials(ca)                       trust `ca` (None: the system's roots)
            channel_credentials(ca, cert, key)            and show a client certificate

Every file is checked before gRPC sees it (gRPC only fails at bind or handshake time, without naming the file):
a missing, unreadable or malformed file, or a key that does not match its certificate, is a `ValueError` whose
message starts with the file's path.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


def read_certificates(path: str | Path, what: str = "certificate") -> bytes:
    """The PEM bytes of `path`, checked to hold at least one well-formed X.509 certificate."""
    data = _read(path, what)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))  # parses each one
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a PEM {what} (expected -----BEGIN CERTIFICATE----- blocks)") from None
    return data


def read_key_pair(cert: str | Path, key: str | Path) -> tuple[bytes, bytes]:
    """(certificate chain, private key) PEM bytes, checked to parse and to belong together."""
    chain = read_certificates(cert)
    private = _read(key, "private key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: "")
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise ValueError(f"{key}: this private key does not belong to the certificate {cert}") from None
        raise ValueError(f"{key}: not an unencrypted PEM private key") from None
    return chain, private


def check_pair(cert: object, key: object, cert_name: str = "tls_cert", key_name: str = "tls_key") -> None:
    """A certificate needs its key and the reverse: ValueError naming the missing one."""
    if (cert is None) != (key is None):
        given, missing = (cert_name, key_name) if key is None else (key_name, cert_name)
        raise ValueError(f"{given} needs {missing} (a certificate and its private key go together)")


def server_tls(cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None = None,
               names: tuple[str, str, str] = ("tls_cert", "tls_key", "tls_client_ca")) -> grpc.ServerCredentials | None:
    """Server credentials from the TLS settings (None: plaintext), every file read and checked; `names` are the
    settings' names for the error messages (a client CA without a certificate is refused, not ignored)."""
    check_pair(cert, key, names[0], names[1])
    if client_ca is not None and cert is None:
        raise ValueError(f"{names[2]} needs {names[0]} and {names[1]} (mutual TLS is TLS plus client certificates)")
    return server_credentials(cert, key, client_ca) if cert is not None and key is not None else None


def server_credentials(cert: str | Path, key: str | Path,
                       client_ca: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS server credentials; with `client_ca`, a client must present a certificate it signed (mutual TLS)."""
    chain, private = read_key_pair(cert, key)
    roots = read_certificates(client_ca, "CA certificate") if client_ca is not None else None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def channel_credentials(ca: str | Path | None = None, cert: str | Path | None = None,
                        key: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting `ca` (None: the system's roots), with a client certificate if given."""
    check_pair(cert, key)
    roots = read_certificates(ca, "CA certificate") if ca is not None else None
    chain, private = read_key_pair(cert, key) if cert is not None and key is not None else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=private, certificate_chain=chain)


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
