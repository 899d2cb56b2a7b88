"""Loopback checks for listen addresses and service URLs (a shared leaf: no Safehold imports).

The services refuse to serve unattested or without TLS anywhere but loopback, and the client
SDK allows plain ``http://`` only to a loopback host; both ask the same question here.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["is_loopback", "is_loopback_http"]


def is_loopback(host: str) -> bool:
    """True if ``host`` is ``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_http(url: str) -> bool:
    """True if ``url`` is plain ``http://`` to a loopback host (:func:`is_loopback`)."""
    parts = urlsplit(url)
    return parts.scheme == "http" and is_loopback(parts.hostname or "")
