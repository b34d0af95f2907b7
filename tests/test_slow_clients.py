"""Slow and greedy clients against a real `fluxport serve`: header and body timeouts, the per-client
connection cap, trusted proxies exempt, and everyone else still served meanwhile."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import free_port
from tests.serveproc import serve, stop
from tests.slowclients import connect_from, slow_clients

CAP = 10
PROXY = "127.0.0.4"


@pytest.fixture(scope="module")
def quick_timeouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A server that cuts headers and bodies off after 1 s."""
    data = tmp_path_factory.mktemp("slow")
    port = free_port()
    proc = serve(
        data,
        port,
        data / "serve.log",
        FLUXPORT_HEADER_TIMEOUT_S="1",
        FLUXPORT_BODY_TIMEOUT_S="1",
        FLUXPORT_MAX_CONNECTIONS_PER_CLIENT="100",
    )
    yield port
    stop(proc)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A server that lets one address hold CAP connections; PROXY is a trusted proxy."""
    data = tmp_path_factory.mktemp("capped")
    port = free_port()
    proc = serve(
        data,
        port,
        data / "serve.log",
        FLUXPORT_HEADER_TIMEOUT_S="30",
        FLUXPORT_MAX_CONNECTIONS_PER_CLIENT=str(CAP),
        FLUXPORT_TRUSTED_PROXIES=json.dumps([PROXY]),
    )
    yield port, proc
    stop(proc)


def _error(answer: bytes) -> dict[str, object]:
    body = answer.split(b"\r\n\r\n", 1)[1]
    return json.loads(body)["error"]  # type: ignore[no-any-return]


def _healthz_while(port: int, seconds: float) -> list[int]:
    statuses = []
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            statuses.append(client.get(f"http://127.0.0.1:{port}/healthz").status_code)
            time.sleep(0.05)
    return statuses


def test_slow_headers_are_cut_off_with_408_and_others_are_served(quick_timeouts: int) -> None:
    # 50 clients that would trickle header bytes for 20 s.
    clients, threads = slow_clients(quick_timeouts, 50, duration_s=20)
    statuses = _healthz_while(quick_timeouts, 2.5)
    for thread in threads:
        thread.join(timeout=15)
    assert statuses and set(statuses) == {200}
    for c in clients:
        assert c.status == 408, c.answer[:200]
        assert c.closed_after_s is not None and c.closed_after_s < 5, c.closed_after_s
        error = _error(c.answer)
        assert error["code"] == "request_timeout" and "FLUXPORT_HEADER_TIMEOUT_S" in str(error["message"])


def test_a_body_that_stops_arriving_is_cut_off_with_408(quick_timeouts: int) -> None:
    # The first body byte arrives with the headers; the next ones, one every 2 s, too late.
    clients, threads = slow_clients(quick_timeouts, 5, body=True, interval_s=2.0, duration_s=20)
    for thread in threads:
        thread.join(timeout=15)
    for c in clients:
        assert c.status == 408, c.answer[:200]
        assert c.closed_after_s is not None and c.closed_after_s < 5, c.closed_after_s
        assert "FLUXPORT_BODY_TIMEOUT_S" in str(_error(c.answer)["message"])


def test_a_slow_but_steady_body_is_not_cut_off(quick_timeouts: int) -> None:
    # A byte every 0.25 s never pauses for the 1 s limit: it runs until the client stops.
    clients, threads = slow_clients(quick_timeouts, 2, body=True, interval_s=0.25, duration_s=3)
    for thread in threads:
        thread.join(timeout=15)
    for c in clients:
        assert c.closed_after_s is None and c.answer == b"", c.answer[:200]


def test_an_idle_kept_alive_connection_is_not_mistaken_for_slow_headers(quick_timeouts: int) -> None:
    # Between requests the keep-alive timeout (5 s) applies, not the 1 s header timeout.
    with httpx.Client(timeout=5) as client:
        first = client.get(f"http://127.0.0.1:{quick_timeouts}/healthz")
        time.sleep(1.8)
        second = client.get(f"http://127.0.0.1:{quick_timeouts}/healthz")
    assert first.status_code == second.status_code == 200


def test_connections_over_the_per_client_cap_get_429_at_once(
    capped: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, _ = capped
    held = [connect_from("127.0.0.3", port) for _ in range(CAP)]
    try:
        time.sleep(0.3)  # the server has counted them
        for _ in range(3):
            extra = connect_from("127.0.0.3", port, timeout_s=3)
            answer = b""
            while chunk := extra.recv(65536):
                answer += chunk
            extra.close()
            assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
            assert b"retry-after: 1" in answer.lower()
            assert "FLUXPORT_MAX_CONNECTIONS_PER_CLIENT" in str(_error(answer)["message"])
        # Another address is not affected.
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        # One closed connection frees a place for that address again.
        held.pop().close()
        time.sleep(0.3)
        again = connect_from("127.0.0.3", port)
        again.sendall(b"GET /healthz HTTP/1.1\r\nhost: fluxport\r\nconnection: close\r\n\r\n")
        answer = b""
        while chunk := again.recv(65536):
            answer += chunk
        again.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    finally:
        for sock in held:
            sock.close()


def test_a_trusted_proxy_is_not_capped(capped: tuple[int, subprocess.Popen[bytes]]) -> None:
    port, _ = capped
    socks: list[socket.socket] = [connect_from(PROXY, port) for _ in range(CAP + 5)]
    try:
        time.sleep(0.3)
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: fluxport\r\nconnection: close\r\n\r\n")
        for sock in socks:
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    finally:
        for sock in socks:
            sock.close()
