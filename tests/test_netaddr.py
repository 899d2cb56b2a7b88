"""``safehold.netaddr``: the loopback checks the services and the client SDK share."""

from __future__ import annotations

import pytest

from safehold.netaddr import is_loopback, is_loopback_http


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "::1"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "example.org", "localhost.", "", "[::1]"])
def test_other_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_loopback_http_urls() -> None:
    assert is_loopback_http("http://127.0.0.1:8080/v1") and is_loopback_http("http://[::1]:1/")
    assert is_loopback_http("http://localhost")
    assert not is_loopback_http("https://127.0.0.1:8080")  # only plain HTTP is the question
    assert not is_loopback_http("http://10.1.2.3/") and not is_loopback_http("127.0.0.1:80")
