"""Network addresses as users write them: "host:port", with IPv6 hosts in brackets ("[::1]:50051")."""

from __future__ import annotations

import ipaddress
import re

__all__ = ["AddressError", "format_address", "is_loopback", "parse_address"]

_ADDRESS_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


class AddressError(ValueError):
    """A "host:port" string that is malformed; the message names what it is and what was expected."""


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """Split "HOST:PORT" (or "[v6]:PORT") into (host, port), the host without brackets; AddressError if malformed."""
    match = _ADDRESS_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise AddressError(f"{what} {text!r} is invalid: expected HOST:PORT with a port in 1..65535")
    host = match.group(1)
    return (host[1:-1] if host.startswith("[") else host), int(match.group(2))


def format_address(host: str, port: int) -> str:
    """"host:port", with an IPv6 host in brackets: the inverse of `parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 possibly in brackets) is this machine's loopback only:
    `localhost` or a loopback IP; any other name may resolve anywhere."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
