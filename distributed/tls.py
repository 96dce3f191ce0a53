"""Encryption between hosts (opt-in): self-signed certificates, pinned by fingerprint.

No certificate authority is involved. ``scripts/setup_pc1.sh --tls`` writes a
self-signed certificate (``generate``; the ``openssl`` command line tool), the node
serves HTTPS with it (``TARS_TLS_CERT`` / ``TARS_TLS_KEY``), and the value PC2 is
given (``--token TOKEN#sha256:FINGERPRINT``) carries its SHA-256 fingerprint, which
PC2 keeps in ``TARS_TLS_PINS``.

Pinning (``Pins.context`` for ``rpc/client.py``): before the first call to an
``https://`` peer, the client makes one TLS handshake that sends nothing, reads the
peer's certificate and compares its fingerprint with the pins (constant time). On a
match that certificate becomes the *only* trust anchor of the client's SSL context;
every later connection is verified by OpenSSL against exactly it (host names are
not checked: the pin is the identity), so a host in the middle fails the handshake
before the token is sent. A node always trusts its own certificate, and the server
learns a joining worker's fingerprint from its join (sent over the pinned channel).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError, PeerError, PeerUnavailable

_HEX = re.compile(r"[0-9a-f]{64}")


def normalize(fingerprint: str) -> str:
    """``sha256:AB:CD:...`` / ``abcd...`` → 64 lower-case hex digits, or ConfigError."""
    fp = fingerprint.strip().lower().removeprefix("sha256:").removeprefix("sha256=").replace(":", "")
    if not _HEX.fullmatch(fp):
        raise ConfigError(f"'{fingerprint[:80]}' is not a SHA-256 certificate fingerprint (64 hex digits)")
    return fp


def fingerprint_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def fingerprint_file(cert: str | Path) -> str:
    """SHA-256 fingerprint of the first certificate in a PEM file."""
    try:
        pem = Path(cert).read_text()
    except OSError as exc:
        raise ConfigError(f"TARS_TLS_CERT={cert}: cannot be read ({exc.strerror or exc})") from None
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----")
    if start < 0 or end < 0:
        raise ConfigError(f"TARS_TLS_CERT={cert}: no PEM certificate in it")
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(pem[start:end + 25]))


def split_token(value: str) -> tuple[str, str]:
    """``TOKEN#sha256:FP`` (what setup_pc1.sh --tls prints) → (token, fingerprint or "")."""
    token, _, fp = value.partition("#")
    return token, normalize(fp) if fp else ""


def generate(cert: str | Path, key: str | Path, names: list[str], ips: list[str], days: int = 3650) -> str:
    """Write a self-signed certificate and its key (0600); return the fingerprint."""
    cert, key = Path(cert), Path(key)
    cert.parent.mkdir(parents=True, exist_ok=True)
    san = ",".join([f"DNS:{n}" for n in dict.fromkeys(names) if n] + [f"IP:{i}" for i in dict.fromkeys(ips) if i])
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-sha256", "-days", str(days), "-keyout", str(key), "-out", str(cert),
           "-subj", f"/CN={(names or ['tars'])[0]}", "-addext", f"subjectAltName={san or 'DNS:localhost'}"]
    key.touch(mode=0o600, exist_ok=True)
    key.chmod(0o600)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("generating a TLS certificate needs the 'openssl' command (apt-get install openssl)") from None
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"openssl could not create the certificate: {exc.stderr.strip()[-300:]}") from None
    key.chmod(0o600)
    return fingerprint_file(cert)


class Pins:
    """The certificate fingerprints a node trusts for ``https://`` peers (shared by its clients)."""

    def __init__(self, fingerprints: list[str] | tuple[str, ...] = (), own: str = "") -> None:
        self.own = normalize(own) if own else ""
        self._fps: set[str] = {normalize(f) for f in fingerprints if f.strip()}
        if self.own:
            self._fps.add(self.own)

    @classmethod
    def from_settings(cls, settings: Any) -> "Pins":
        own = fingerprint_file(settings.tls_cert) if getattr(settings, "tls_cert", "") else ""
        return cls(list(getattr(settings, "tls_pins", ()) or ()), own)

    def add(self, fingerprint: str) -> None:
        self._fps.add(normalize(fingerprint))

    def __bool__(self) -> bool:
        return bool(self._fps)

    def matches(self, der: bytes) -> bool:
        got = fingerprint_der(der).encode()
        found = False
        for fp in list(self._fps):  # every pin is compared, in constant time each
            found |= hmac.compare_digest(got, fp.encode())
        return found

    def context(self) -> "PinnedContext":
        return PinnedContext(self)


class PinnedContext:
    """An SSL context for one peer that trusts only the certificate whose fingerprint is pinned."""

    def __init__(self, pins: Pins) -> None:
        self.pins = pins
        self.ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ssl.check_hostname = False  # the pin is the identity (self-signed, no CA)
        self.ssl.verify_mode = ssl.CERT_REQUIRED  # nothing verifies until pin() loads the peer's certificate
        self.pinned: str = ""
        self._lock = asyncio.Lock()

    async def pin(self, url: str, name: str, timeout: float) -> None:
        """Fetch the peer's certificate once (a handshake that sends nothing) and trust it if pinned."""
        if self.pinned:
            return
        async with self._lock:
            if self.pinned:
                return
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port or 443
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.check_hostname = False
            probe.verify_mode = ssl.CERT_NONE
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=probe), timeout)
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                raise PeerUnavailable(f"peer {name} ({url}) is unreachable over TLS: {exc or type(exc).__name__}",
                                      peer=name, phase="connect") from None
            try:
                der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True) or b""
            finally:
                writer.close()
            if not der or not self.pins.matches(der):
                raise PeerError(f"peer {name} ({url}) presented a TLS certificate (sha256 {fingerprint_der(der)}) "
                                "that is not pinned: TARS_TLS_PINS must hold its fingerprint (setup_pc1.sh --tls "
                                "prints it)", peer=name)
            self.ssl.load_verify_locations(cadata=ssl.DER_cert_to_PEM_cert(der))
            self.pinned = fingerprint_der(der)


def main(argv: list[str]) -> int:
    """``python -m distributed.tls generate CERT KEY [--name N]... [--ip A]...`` → prints the
    fingerprint; ``python -m distributed.tls fingerprint CERT``."""
    if len(argv) >= 3 and argv[0] == "generate":
        names = [argv[i + 1] for i, a in enumerate(argv) if a == "--name" and i + 1 < len(argv)]
        ips = [argv[i + 1] for i, a in enumerate(argv) if a == "--ip" and i + 1 < len(argv)]
        print(generate(argv[1], argv[2], names, ips))
        return 0
    if len(argv) == 2 and argv[0] == "fingerprint":
        print(fingerprint_file(argv[1]))
        return 0
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
