"""Address rules for user-given places: refused by default, opened on purpose, checked at connect time."""

from __future__ import annotations

import ipaddress
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from deputies.netguard import UnsafeAddress, check_url, guarded_client, parse_networks, refusal

LOOPBACK = parse_networks("127.0.0.0/8,::1/128", "T")


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "cloud metadata"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("100.64.0.1", "shared"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
    ],
)
def test_it_refuses_non_public_addresses_by_default(address, kind):
    assert kind in refusal(ipaddress.ip_address(address))


def test_it_accepts_public_addresses_and_allowed_ranges():
    # Only classified, never connected to.
    assert refusal(ipaddress.ip_address("93.184.216.34")) == ""
    assert refusal(ipaddress.ip_address("127.0.0.5"), LOOPBACK) == ""


def test_it_names_the_setting_that_opens_a_refused_range():
    with pytest.raises(UnsafeAddress, match="DEPUTIES_CALLBACK_ALLOWED_NETWORKS"):
        check_url("http://127.0.0.1:9/hook")
    with pytest.raises(UnsafeAddress, match="scheme"):
        check_url("file:///etc/passwd")
    with pytest.raises(UnsafeAddress, match="no host"):
        check_url("http:///x")
    check_url("http://127.0.0.1:9/hook", allowed=LOOPBACK)


def test_it_rejects_bad_allow_lists_naming_the_variable():
    with pytest.raises(ValueError, match="DEPUTIES_X"):
        parse_networks("10.0.0.0/8, nonsense", "DEPUTIES_X")


@pytest.fixture
def receiver():
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}", hits
    server.shutdown()


def test_it_checks_the_address_it_connects_to_not_only_the_name(receiver):
    url, hits = receiver
    # "localhost" passes no literal check: only the resolved address tells it is loopback.
    with guarded_client((), "DEPUTIES_CALLBACK_ALLOWED_NETWORKS") as client:
        with pytest.raises(UnsafeAddress, match="loopback"):
            client.post(url + "/hook")
    assert hits == []


def test_it_connects_to_allowed_ranges_and_never_follows_redirects(receiver):
    url, hits = receiver
    with guarded_client(LOOPBACK, "T") as client:
        response = client.post(url + "/hook")
    assert response.status_code == 302
    assert hits == ["/hook"]


def test_it_ignores_proxies_from_the_environment(receiver, monkeypatch):
    url, hits = receiver
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with guarded_client(LOOPBACK, "T") as client:
        assert client.post(url + "/p").status_code == 302
    assert hits == ["/p"]
    assert isinstance(client, httpx.Client)


def test_it_resolves_from_the_hosts_file_only_when_dns_is_off(settings):
    settings.RESOLVE_NAMES = False  # as in every test: a DNS query would leave loopback
    with pytest.raises(UnsafeAddress, match="loopback"):
        check_url("http://localhost:9/hook")  # /etc/hosts knows it
    with pytest.raises(UnsafeAddress, match="DEPUTIES_RESOLVE_NAMES=false"):
        check_url("https://deputies-test.invalid/hook")
