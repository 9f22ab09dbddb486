"""The fetch connects to public addresses only: loopback servers refused by default, redirects checked, schemes."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pytest

from pipelines.download.fetch import fetch
from pipelines.download.guard import BLOCKED, AddressGuard, non_public
from stores.catalog import REASON_SQL, RETRYABLE_SQL
from tests.pipelines.hostile_server import HostileServer

BLOCKED_IPS = [
    "127.0.0.1",
    "127.0.0.2",
    "0.0.0.0",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "2001:db8::1",
]
PUBLIC_IPS = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[HostileServer, HostileServer]]:
    """One server on 127.0.0.1 and one on 127.0.0.2 (Linux routes all of 127.0.0.0/8 to loopback)."""
    with HostileServer(seed=4) as first, HostileServer(seed=4, host="127.0.0.2") as second:
        yield first, second


def get(url: str, allow: bool | Sequence[str] = False, retries: int = 0) -> tuple[bytes | None, str | None]:
    _, stream, error = fetch((0, url), 1.0, retries, None, None, 5.0, allow_private_addresses=allow)
    return (stream.getvalue() if stream else None), error


def reason(error: str) -> tuple[str, bool]:
    """The catalog's (reason, retryable) of a failed download's message."""
    sql = f"SELECT reason, {RETRYABLE_SQL} FROM (SELECT {REASON_SQL} AS reason FROM (SELECT $s AS status, $e AS error_message))"  # noqa: E501
    with duckdb.connect() as con:  # its own connection: a half-read result would block the default one
        return con.execute(sql, {"s": "failed_to_download", "e": error}).fetchone()


@pytest.mark.parametrize("ip", BLOCKED_IPS)
def test_non_public_addresses_are_refused_unless_their_network_is_allowed(ip: str) -> None:
    address = ipaddress.ip_address(ip)
    assert non_public(address) is not None
    assert AddressGuard.of(False).refusal(address) is not None
    assert AddressGuard.of(True).refusal(address) is None
    plain = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else address
    assert AddressGuard.of([f"{plain}/{plain.max_prefixlen}"]).refusal(address) is None


@pytest.mark.parametrize("ip", PUBLIC_IPS)
def test_public_addresses_pass(ip: str) -> None:
    assert AddressGuard.of(False).refusal(ipaddress.ip_address(ip)) is None


def test_a_loopback_server_is_refused_by_default_and_fetched_when_allowed(servers: tuple) -> None:
    server, _ = servers
    port = server.server_address[1]
    body = next(c.body for c in server.cases if c.name == "jpeg")
    before = server.requests["jpeg"]
    hosts = ["127.0.0.1", "localhost", "127.0.0.2", "0.0.0.0", "[::1]", "[::ffff:127.0.0.1]"]
    for host in hosts:
        data, error = get(f"http://{host}:{port}/case/jpeg", retries=2)
        assert data is None and error.startswith(BLOCKED), host
        assert ("unspecified" if host == "0.0.0.0" else "loopback") in error, error
        assert reason(error) == ("blocked_address", False), error
    assert server.requests["jpeg"] == before  # nothing connected, and a refusal is not retried
    assert get(server.url("jpeg"), allow=True) == (body, None)
    assert get(f"http://localhost:{port}/case/jpeg", allow=["127.0.0.0/8", "::1/128"]) == (body, None)
    assert get(f"http://[::ffff:127.0.0.1]:{port}/case/jpeg", allow=["127.0.0.1/32"]) == (body, None)


def test_a_redirect_from_an_allowed_host_to_a_blocked_one_is_refused(servers: tuple) -> None:
    first, second = servers
    body = next(c.body for c in second.cases if c.name == "jpeg")
    target = second.url("jpeg")  # on 127.0.0.2
    assert get(first.url("jpeg"), allow=["127.0.0.1/32"])[1] is None  # the first server is allowed ...
    data, error = get(target, allow=["127.0.0.1/32"])  # ... the second is not
    assert data is None and error.startswith(f"{BLOCKED}: 127.0.0.2 (loopback)")
    data, error = get(first.redirect(target), allow=["127.0.0.1/32"])  # the redirect connects again: checked again
    assert data is None and error.startswith(f"{BLOCKED}: 127.0.0.2 (loopback)")
    assert reason(error) == ("blocked_address", False) and second.requests["jpeg"] == 0
    assert get(first.redirect(target), allow=True) == (body, None)  # the redirect itself works
    assert second.requests["jpeg"] == 1


def test_schemes_are_case_insensitive_and_only_http_is_fetched(servers: tuple) -> None:
    server, _ = servers
    body = next(c.body for c in server.cases if c.name == "jpeg")
    for scheme in ("HTTP", "Http"):
        assert get(server.url("jpeg").replace("http:", f"{scheme}:"), allow=True) == (body, None)
    refused = [
        "ftp://127.0.0.1/x.jpg",
        "FTP://example.com/x.jpg",
        "file:///etc/passwd",
        "data:image/png;base64,AA==",
        "example.com/x.jpg",
        "javascript:alert(1)",
    ]
    refused += [server.redirect(u) for u in ("ftp://127.0.0.1/x.jpg", "file:///etc/passwd", "data:,x")]
    for url in refused:
        data, error = get(url, allow=True)
        assert data is None and reason(error) == ("blocked_address", False), (url, error)


def test_https_keeps_the_host_name_for_sni_and_the_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x509 = pytest.importorskip("cryptography.x509")  # moto's dependency: a self-signed certificate for localhost
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))  # the client trusts it, for the name localhost
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    names: list[str | None] = []
    context.sni_callback = lambda _sock, server_name, _ctx: names.append(server_name)
    with HostileServer(seed=4) as server:
        server.socket = context.wrap_socket(server.socket, server_side=True)
        body = next(c.body for c in server.cases if c.name == "jpeg")
        url = f"https://localhost:{server.server_address[1]}/case/jpeg"
        assert get(url)[1].startswith(f"{BLOCKED}: localhost -> ")
        assert get(url, allow=["127.0.0.1/32", "::1/128"]) == (body, None)  # connected to the IP, verified the name
    assert names == ["localhost"]
