"""Ports for the stacks the tests and benchmarks start: free, distinct, and out of the way of
outgoing connections."""

from __future__ import annotations

import socket

import pytest

from recsys.local import stack
from recsys.local.stack import FREE_PORTS_FROM, free_port


def test_ports_are_distinct_bindable_and_below_the_outgoing_range() -> None:
    low, _ = stack._outgoing_ports()
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert FREE_PORTS_FROM <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_port_with_a_listener_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        low, _ = stack._outgoing_ports()
        other = free_port()
        stack._handed_out.discard(other)
        draws = iter([taken, other])
        monkeypatch.setattr(stack.random, "randrange", lambda a, b: next(draws))
        monkeypatch.setattr(stack, "_outgoing_ports", lambda: (max(low, taken + 1), 60999))
        assert free_port() == other
