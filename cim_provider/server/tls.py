"""TLS for the HTTPS listeners: a server context (TLS 1.2 or newer only) and a
self-signed certificate made on first use when the operator gives none.

The pair is generated with the `openssl` command line (the `cryptography` package is
not a dependency). The key is written with mode 0600 and both files are moved into
place only once complete, so a crash never leaves half a pair behind.

A pair the operator gives is checked before OpenSSL sees it, so that a refusal names the
file and the problem (missing, not PEM, a certificate without its key, a key that does
not match or is encrypted) instead of OpenSSL's "PEM lib".
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CERT_NAME = "server.crt"
KEY_NAME = "server.key"


class TLSError(ValueError):
    """A certificate or key the server cannot use; str() names the file and the problem."""


def _pem(path: Path, option: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise TLSError(f"{option} {path} is a directory, not a PEM file") from None
    except OSError as exc:
        raise TLSError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise TLSError(f"{option} {path} is not a PEM file (no -----BEGIN line; a DER file "
                       f"converts with `openssl x509 -inform der`)")
    return data


def check_pair(cert: Path, key: Path | None) -> None:
    """TLSError naming the file when the pair is unusable before OpenSSL is asked:
    missing or unreadable files, not PEM, no certificate, a certificate without key."""
    data = _pem(cert, "--cert")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSError(f"--cert {cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    if key is None:
        if b"PRIVATE KEY-----" not in data:
            raise TLSError(f"--cert {cert} holds a certificate but no private key: give --key")
    elif b"PRIVATE KEY-----" not in _pem(key, "--key"):
        raise TLSError(f"--key {key} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)")


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A server-side context refusing SSLv3, TLS 1.0 and 1.1; TLSError for a pair it
    cannot use (which file, and why)."""
    cert, key = Path(cert), (Path(key) if key else None)
    check_pair(cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    asked: list[bool] = []

    def no_passphrase() -> bytes:     # never prompt on the terminal, as OpenSSL would
        asked.append(True)
        raise TLSError("encrypted")

    where = f"--key {key}" if key else f"--cert {cert}"
    try:
        ctx.load_cert_chain(str(cert), str(key) if key else None, password=no_passphrase)
    except (ssl.SSLError, TLSError) as exc:
        if asked:
            raise TLSError(f"{where}: the private key is encrypted; the server cannot ask "
                           f"for its passphrase (decrypt it with `openssl pkey`)") from None
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise TLSError(f"{where}: the private key does not match the certificate in "
                           f"--cert {cert}") from None
        raise TLSError(f"--cert {cert}" + (f" / --key {key}" if key else "")
                       + f": OpenSSL cannot use them ({getattr(exc, 'reason', None) or exc})"
                       ) from None
    return ctx


def _alt_names(hostname: str) -> str:
    names = {"DNS:localhost", "IP:127.0.0.1", "IP:::1"}
    try:
        ipaddress.ip_address(hostname)
        names.add(f"IP:{hostname}")
    except ValueError:
        if hostname:
            names.add(f"DNS:{hostname}")
    return ",".join(sorted(names))


def ensure_self_signed(directory: Path, hostname: str, days: int = 3650) -> tuple[Path, Path]:
    """(cert, key) in `directory`, created there if either is missing."""
    directory = Path(directory)
    cert, key = directory / CERT_NAME, directory / KEY_NAME
    if cert.exists() and key.exists():
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("no --cert given and the openssl command is not installed to "
                           "create a self-signed certificate")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".tls-") as tmp:
        tkey, tcert = Path(tmp) / KEY_NAME, Path(tmp) / CERT_NAME
        cn = (hostname or "localhost")[:64].replace("/", "_")
        proc = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
             "-days", str(days), "-keyout", str(tkey), "-out", str(tcert),
             "-subj", f"/O=cim-provider/CN={cn}", "-addext", f"subjectAltName={_alt_names(hostname)}"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "OPENSSL_CONF": os.devnull})
        if proc.returncode != 0:
            raise RuntimeError(f"openssl could not create a certificate: "
                               f"{proc.stderr.strip()[-500:]}")
        os.chmod(tkey, 0o600)
        os.replace(tkey, key)
        os.replace(tcert, cert)
    log.warning("created a self-signed certificate %s (key %s); clients must be told to "
                "trust it, or give --cert/--key", cert, key)
    return cert, key
