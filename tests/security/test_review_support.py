"""Helpers of the review app's security tests (no tests here): a real lake with findings, the
real app served by uvicorn on loopback (in a thread, or as the `pacsflow review` CLI in a
subprocess), logins through the login form, a test CA and server certificate, audit records.

The lake is built once per test session (synthesize -> crawl -> deid -> tensors -> infer) and
shared by the security test modules; tests that write decisions count rows before and after.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.config import PipelineConfig, load_config
from pipeline.lake import LakePaths, read_table

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0
#: test-only passwords of users that live for one test on loopback
PASSWORDS = {
    "lena": "lead-password-for-tests",
    "rudi": "reviewer-password-for-tests",
    "adam": "admin-password-for-tests",
}
ROLES = {"lena": "lead", "rudi": "reviewer", "adam": "admin"}
VIEWER_URL = "https://viewer.invalid/ohif/viewer?StudyInstanceUIDs={StudyInstanceUID}"

_LAKES: dict[str, LakePaths] = {}
_HASHES: dict[str, str] = {}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shared_lake(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> LakePaths:
    """A small real lake of the key in ``key_file``, with findings (built once per session)."""
    if str(key_file) not in _LAKES:
        from review_factory import build_review_lake

        from pipeline.lake.keys import load_key

        root = tmp_path_factory.mktemp("review-security")
        _LAKES[str(key_file)] = build_review_lake(root, load_key(key_file), seed=6161)
    return _LAKES[str(key_file)]


def password_hash(user: str) -> str:
    """The argon2 hash of a test user's password (made once)."""
    from pipeline.review.app import hash_password

    if user not in _HASHES:
        _HASHES[user] = hash_password(PASSWORDS[user])
    return _HASHES[user]


def review_settings(**extra: Any) -> dict[str, Any]:
    """The ``review`` section of the tests' configs: three users, one of each role."""
    return {
        "users": {u: {"password_hash": password_hash(u), "role": ROLES[u]} for u in PASSWORDS},
        "viewer_url": VIEWER_URL,
        "viewer_roles": ["lead", "admin"],
        **extra,
    }


def review_config(lake: LakePaths, **extra: Any) -> PipelineConfig:
    """A config of ``lake`` whose ``review`` section is :func:`review_settings`."""
    return load_config(
        overrides={"lake": str(lake.root), "review": review_settings(**extra)}, environ={}
    )


def audit_log(lake: LakePaths, key_file: Path) -> Any:
    """The lake's real audit log (keyed; no witness outside the lake in tests)."""
    from pipeline.lake import AuditLog
    from pipeline.lake.keys import LakeKeys, load_key

    return AuditLog(lake, LakeKeys(load_key(key_file)), witness="none")


def audit_records(lake: LakePaths) -> list[dict[str, Any]]:
    """Every record of the lake's audit log, oldest first."""
    import json

    path = lake.audit / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def serve(
    cfg: PipelineConfig,
    lake: LakePaths,
    key_file: Path,
    *,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> Iterator[str]:
    """The real app served by uvicorn in a thread on a free loopback port; yields its URL."""
    import uvicorn

    from pipeline.review.app import create_app, server_config

    tls = certfile is not None
    app = create_app(cfg, lake, audit=audit_log(lake, key_file), secret="test-secret", tls=tls)
    port = free_port()
    server = uvicorn.Server(
        server_config(app, host="127.0.0.1", port=port, certfile=certfile, keyfile=keyfile)
    )
    thread = threading.Thread(target=server.run, name="review-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the review app did not start")
        time.sleep(0.05)
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT_S)


@dataclass
class CliServer:
    """`pacsflow review` running as a subprocess."""

    proc: subprocess.Popen[str]
    url: str
    output: str | None = None

    def stop(self) -> str:
        """Stop it (by its PID) and return what it printed."""
        if self.output is not None:
            return self.output
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT_S)
        self.output, _ = self.proc.communicate()
        return self.output

    def rss_kib(self, field: str = "VmRSS") -> int:
        """The process's resident memory (``VmRSS``) or its peak (``VmHWM``), in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")


def cli_env() -> dict[str, str]:
    """The environment of CLI subprocesses: no audit witness outside the lake."""
    return {**os.environ, "PACSFLOW__AUDIT__WITNESS": "none"}


@contextlib.contextmanager
def serve_cli(args: list[str], *, url: str, verify: str | bool = True) -> Iterator[CliServer]:
    """Run ``pacsflow <args>`` and wait until ``url``/login answers; stop it afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli.main", *args],
        cwd=REPO_ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = CliServer(proc, url)
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pacsflow review exited {proc.returncode}: {server.stop()}")
            try:
                requests.get(url + "/login", timeout=2, verify=verify)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"pacsflow review did not answer: {server.stop()}")
                time.sleep(0.2)
        yield server
    finally:
        server.stop()


def csrf_token(html: str) -> str:
    """The CSRF token of a page's form."""
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match is not None, "no CSRF token in the page"
    return match.group(1)


def post_login(
    s: requests.Session, base: str, user: str, password: str, **kw: Any
) -> requests.Response:
    """GET the login form, then POST it with ``user`` and ``password`` (no redirects)."""
    page = s.get(base + "/login", timeout=WAIT_S, **kw)
    return s.post(
        base + "/login",
        data={"username": user, "password": password, "csrf": csrf_token(page.text)},
        timeout=WAIT_S,
        allow_redirects=False,
        **kw,
    )


def logged_in(base: str, user: str, **kw: Any) -> requests.Session:
    """A `requests` session logged in as ``user`` through the login form."""
    s = requests.Session()
    r = post_login(s, base, user, PASSWORDS[user], **kw)
    assert r.status_code == 303, (r.status_code, r.text[:300])
    return s


@dataclass(frozen=True)
class Tls:
    """A test CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    ca: Path
    cert: Path
    key: Path
    spki_sha256: str  # base64 SHA-256 of the server key's SubjectPublicKeyInfo


def make_tls(folder: Path) -> Tls:
    """Make a CA and a server certificate signed by it (``cryptography``), valid one day."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacsflow test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Tls(folder / "ca.pem", folder / "server.pem", folder / "server.key", "")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Tls(
        paths.ca, paths.cert, paths.key, base64.b64encode(hashlib.sha256(spki).digest()).decode()
    )


def finding_rows(lake: LakePaths) -> list[dict[str, Any]]:
    """The findings table's rows."""
    return read_table(lake, "findings").to_pylist()
