"""Debian's haproxy in front of several blogchat servers, as docs/deployment.md configures it.

The test owns the proxy: a config in its temporary directory, a free port, and an admin
socket through which the test reads each backend's state (`show stat`), so a test waits
for "marked down" as an event instead of sleeping.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.server import end_process, free_port

HAPROXY = os.environ.get("BLOGCHAT_TEST_HAPROXY", "haproxy")

# Health checks every 250 ms, down after 2 failures (and at once when live traffic cannot
# connect), up again after 1 success; a check may take 2 s, since a busy instance answers
# /healthz late but is not down (a dead one refuses the connection at once). A request
# that meets a dead backend is sent to another (`retries`, `option redispatch`).
CONFIG = """\
global
    maxconn 4096
    stats socket {admin} mode 600 level admin

defaults
    mode http
    option forwardfor
    retries 2
    option redispatch
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout http-request 10s
    timeout queue 10s
    timeout check 2s

frontend blogchat
    bind 127.0.0.1:{port}
    default_backend instances

backend instances
    balance {balance}
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 250ms fastinter 250ms downinter 500ms fall 2 rise 1 \
observe layer4 error-limit 1 on-error mark-down
{servers}
"""


def haproxy_problem() -> str | None:
    """Why haproxy cannot run here, or None."""
    if shutil.which(HAPROXY) is None:
        return f"{HAPROXY!r} is not installed (apt-get install haproxy)"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    port: int


class Haproxy:
    """One haproxy process balancing over `backends`; a context manager."""

    def __init__(
        self, backends: Sequence[Backend], directory: Path, *, balance: str = "roundrobin"
    ) -> None:
        self.backends = list(backends)
        self.directory = directory
        self.balance = balance
        self.port = free_port()
        self.admin = directory / "haproxy.sock"
        self.config = directory / "haproxy.cfg"
        self.log = directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> Haproxy:
        """Write the config, start haproxy and wait until every backend is up."""
        servers = "\n".join(f"    server {b.name} 127.0.0.1:{b.port} check" for b in self.backends)
        self.config.write_text(
            CONFIG.format(admin=self.admin, port=self.port, balance=self.balance, servers=servers)
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-f", str(self.config), "-db"], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            for backend in self.backends:
                self.wait_for(backend.name, "UP", timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        end_process(self.process, grace=10)

    def __enter__(self) -> Haproxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self, line: str) -> str:
        """One command on the admin socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> list[dict[str, str]]:
        """`show stat` for each backend server: its row of haproxy's statistics."""
        answer = self.command("show stat").lstrip("# ")
        return [
            row
            for row in csv.DictReader(io.StringIO(answer))
            if row["pxname"] == "instances" and row["svname"] not in ("BACKEND", "FRONTEND")
        ]

    def states(self) -> dict[str, str]:
        """Each backend server's state as haproxy sees it: UP, DOWN, ..."""
        return {row["svname"]: row["status"].split(" ")[0] for row in self.servers()}

    def sessions(self) -> dict[str, int]:
        """How many sessions (requests, WebSockets) each backend server has taken so far."""
        return {row["svname"]: int(row["stot"]) for row in self.servers()}

    def wait_for(self, name: str, state: str, *, timeout: float) -> float:
        """Wait until backend `name` is in `state`; how long it took, in seconds."""
        started = time.monotonic()
        deadline = started + timeout
        last: str | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited: {self.log.read_text()[-2000:]}")
            try:
                last = self.states().get(name)
            except OSError:
                last = None  # the admin socket is not there yet
            if last == state:
                return time.monotonic() - started
            time.sleep(0.02)
        raise TimeoutError(f"backend {name} is {last}, not {state}, after {timeout} s")
