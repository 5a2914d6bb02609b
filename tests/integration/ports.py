"""Loopback ports for the servers tests start.

Ports are taken below the kernel's ephemeral range (32768-60999 here), so a
client connection's local port can never take one between our check and the
server's bind, and none is handed out twice in a test session.
"""

from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20000, 32000
_handed_out: set[int] = set()
_rng = random.Random()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reserve_ports(count: int) -> list[int]:
    """`count` consecutive free ports (SeaweedFS lays its dozen ports out from a base)."""
    for _ in range(500):
        base = _rng.randrange(_LOW, _HIGH - count)
        block = list(range(base, base + count))
        if not _handed_out.intersection(block) and all(_bindable(port) for port in block):
            _handed_out.update(block)
            return block
    raise RuntimeError(f"no block of {count} free ports in [{_LOW}, {_HIGH})")
