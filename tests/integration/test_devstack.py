"""The servers tests and the demo start: what they do when a port picked as free is taken."""

from __future__ import annotations

import socket

from pipeline.devstack import NatsServer


def test_nats_server_whose_port_was_taken_meanwhile_starts_on_another(tmp_path) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        server = NatsServer(tmp_path)
        busy = server.port = taken.getsockname()[1]  # as if another process got there first
        server.start()
        try:
            assert server.port != busy
            assert server.running
            assert "address already in use" in server.tail(200)
        finally:
            server.stop()
    finally:
        taken.close()
