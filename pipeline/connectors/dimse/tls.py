"""DICOM TLS (PS3.15 B.1): the SSL contexts of our associations and of our Storage SCP."""

from __future__ import annotations

import ssl
from functools import lru_cache
from pathlib import Path

from pipeline.config.models import DimseTlsConfig
from pipeline.errors import ConfigError

__all__ = ["check_tls", "client_ssl_context", "server_ssl_context"]


@lru_cache(maxsize=16)
def client_ssl_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The TLS context of our associations: verifies the PACS, presents our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


@lru_cache(maxsize=16)
def server_ssl_context(ca: Path | None, cert: Path, key: Path | None) -> ssl.SSLContext:
    """The TLS context of our C-MOVE Storage SCP: same material, server side, client certs."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca) if ca else None)
    ctx.load_cert_chain(str(cert), str(key) if key else None)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def check_tls(tls: DimseTlsConfig, *, move: bool) -> None:
    """Check the TLS material of a source now, so a bad file is a config error, not a crawl error.

    Parameters
    ----------
    tls:
        The ``dimse.tls`` section.
    move:
        Whether the source retrieves by C-MOVE (then our Storage SCP needs a certificate).

    Raises
    ------
    ConfigError
        For a missing or unreadable file, or C-MOVE without a certificate.
    """
    for label, path in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"dimse.tls.{label} file not found: {path}")
    if move and tls.cert is None:
        raise ConfigError(
            "C-MOVE over TLS needs dimse.tls.cert and dimse.tls.key: the PACS connects "
            "to our Storage SCP, which must present a certificate (or set "
            "dimse.retrieve: get)"
        )
    try:
        client_ssl_context(tls.ca, tls.cert, tls.key)
        if tls.cert is not None and move:
            server_ssl_context(tls.ca, tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the DICOM TLS files in dimse.tls: {exc}") from exc
