"""The address policy: forbidden URLs never connect, allowlist, private addresses, DNS rebinding, TLS names."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time

import pytest

from backend.core.images.ssrf import is_public  # bound before ``public_foreign`` patches the module attribute
from tests.backend.core.images.helpers import LEGACY, PAT, FakeServer, encode, reason_of, red_blue

# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True), ("2002:808:808::", True),
    ("64:ff9b::808:808", True),
    ("10.0.0.1", False), ("127.0.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("224.0.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fe80::1", False), ("fc00::1", False),
    ("::ffff:127.0.0.1", False), ("2002:7f00:1::", False), ("64:ff9b::7f00:1", False),  # v4 inside v6 is judged as v4
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo hides the real endpoint
])
def test_is_public(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "ftp://127.0.0.2/a.png",
    "dict://127.0.0.1:6379/info",
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:6379/",
    "http://localhost:6379/",
    "http://[::1]:6379/",
    "http://[::ffff:127.0.0.1]:6379/",
    "http://2130706433:6379/",
    "http://0.0.0.0:6379/",
    "http://10.1.2.3/a.png",
    "//169.254.169.254/latest/",
    "/\\169.254.169.254/latest/",
    "http://user:pw@127.0.0.2/a.png",
    "javascript:alert(1)",
])
def test_forbidden_urls_never_connect(make_loader, connections, url):
    loader = make_loader(image_allowed_hosts="*")  # the address check must refuse, not the allowlist
    start = time.monotonic()
    assert reason_of(loader, url) == "forbidden_url"
    assert connections == [] and time.monotonic() - start < 2


def test_foreign_host_needs_allowlist_and_gets_no_credentials(make_loader, ls, foreign, connections):
    foreign.files["/a.png"] = (encode(red_blue()), "image/png")
    assert reason_of(make_loader(image_allowed_hosts=""), f"{foreign.url}/a.png") == "forbidden_url"
    assert connections == [] and foreign.requests == []
    for key in (LEGACY, PAT):
        assert make_loader(label_studio_api_key=key).load(f"{foreign.url}/a.png").width == 40
    assert foreign.auth_headers() == [None, None]
    assert ls.requests == [], "a PAT is not even exchanged for a foreign image"


def test_allow_private(make_loader, ls, foreign):
    """With LS on 127.0.0.2, the 127.0.0.1 server is a private foreign host."""
    ls.files["/a.png"] = (encode(red_blue()), "image/png")
    url = f"{ls.url}/a.png"
    assert reason_of(make_loader(label_studio_url=foreign.url, image_allowed_hosts="*"), url) == "forbidden_url"
    loaded = make_loader(label_studio_url=foreign.url, image_allowed_hosts="127.0.0.1", image_allow_private=True).load(url)
    assert loaded.width == 40 and ls.auth_headers() == [None]


def test_redirect_from_allowed_host_to_private_address_is_refused(make_loader, foreign, connections):
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen()
    trap.settimeout(0.2)
    port = trap.getsockname()[1]
    foreign.redirects["/r1"] = f"http://127.0.0.1:{port}/secret"
    foreign.redirects["/r2"] = "http://169.254.169.254/latest/meta-data/"
    foreign.redirects["/r3"] = f"http://localhost:{port}/"
    try:
        for route in ("/r1", "/r2", "/r3"):
            for hosts in ("127.0.0.2", "*"):
                reason = reason_of(make_loader(image_allowed_hosts=hosts), f"{foreign.url}{route}")
                assert reason == "forbidden_url", (route, hosts)
        with pytest.raises(socket.timeout):
            trap.accept()
    finally:
        trap.close()
    assert {addr[0] for addr in connections} == {"127.0.0.2"}


def test_dns_is_checked_once_and_the_checked_address_is_used(make_loader, foreign, connections, monkeypatch):
    """DNS rebinding: the name resolves to a public address for the check and a private one
    right after; the loader connects to what it checked, and re-checks on a new connection."""
    answers = {"rebind.test": ["127.0.0.2", "127.0.0.1"], "mixed.test": [["127.0.0.2", "10.0.0.1"]]}
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in answers:
            ips = answers[host].pop(0)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ([ips] if isinstance(ips, str) else ips)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    foreign.files["/a.png"] = (encode(red_blue()), "image/png")
    port = foreign.url.rsplit(":", 1)[1]
    loader = make_loader(image_allowed_hosts="rebind.test,mixed.test")
    assert loader.load(f"http://rebind.test:{port}/a.png").width == 40
    assert foreign.requests[0][2]["Host"] == f"rebind.test:{port}"
    assert answers["rebind.test"] == ["127.0.0.1"], "resolved exactly once"
    assert reason_of(loader, f"http://rebind.test:{port}/a.png") == "forbidden_url"
    assert reason_of(loader, f"http://mixed.test:{port}/a.png") == "forbidden_url"
    assert [addr[0] for addr in connections] == ["127.0.0.2"]


def test_https_label_studio_keeps_the_host_name_for_tls(make_loader, tmp_path):
    """The guard connects to the checked IP; certificate verification must still use the name."""
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server = FakeServer("127.0.0.1", context)
    try:
        server.auth = {f"Token {LEGACY}"}
        server.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
        port = server.httpd.server_address[1]
        loader = make_loader(label_studio_url=f"https://localhost:{port}")
        loader._session.verify = str(cert_file)
        assert loader.load("/data/upload/1/a.png").width == 40
        assert server.auth_headers() == [f"Token {LEGACY}"]
        by_ip = make_loader(label_studio_url=f"https://127.0.0.1:{port}")  # not a name on the cert
        by_ip._session.verify = str(cert_file)
        assert reason_of(by_ip, "/data/upload/1/a.png") == "http_error"
        assert len(server.requests) == 1
    finally:
        server.httpd.shutdown()
