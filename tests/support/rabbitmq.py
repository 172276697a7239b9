"""A private RabbitMQ node for tests: Debian's rabbitmq-server run as a subprocess.

Everything is the node's own: temp directories (database, logs, HOME for the Erlang cookie), free
ports on 127.0.0.1 (AMQP, Erlang distribution, and a private epmd), a unique node name, no
plugins, a config file of ours (the system's /etc/rabbitmq files are not read). The node starts
once per test session; ``stop()`` / ``start()`` let a test take the broker away and bring it
back on the same port with the same data. Import the fixture explicitly where needed::

    from tests.support.rabbitmq import rabbitmq  # noqa: F401

``CutProxy`` relays TCP to the node and can cut every connection once a client has sent a given
number of bytes (a broker lost in the middle of a batch, at a deterministic point).

Without the binary the tests using it SKIP, except when ``CI`` is set: then they FAIL, because
``.ci/run`` installs it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pika  # type: ignore[import-untyped]  # no stubs published
import pika.exceptions  # type: ignore[import-untyped]
import pytest

from tests.support.served import free_port

__all__ = ["CutProxy", "RabbitNode", "find_server", "rabbitmq"]

USER = "octisync"
PASSWORD = "octisync-test-password"
_START_TIMEOUT_S = 90.0  # a cold Erlang VM on a busy 2-core machine


def find_server() -> str | None:
    """The real start script (Debian's /usr/sbin wrapper switches to the rabbitmq user)."""
    direct = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if direct.is_file() and os.access(direct, os.X_OK):
        return str(direct)
    return shutil.which("rabbitmq-server")


_NODES = itertools.count(1)


class RabbitNode:
    """One broker node; ``url`` is its amqp:// URL (user and password included)."""

    def __init__(self, server: str, base: Path) -> None:
        self.server = server
        self.base = base
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        # Unique per node, not only per process: a module's own broker runs beside the session's.
        self.nodename = f"octisync-{os.getpid()}-{next(_NODES)}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("mnesia", "log", "home"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        # Small limits: a test machine's disk or memory must not raise a resource alarm that
        # blocks publishers; guest-style loopback restriction is moot on 127.0.0.1.
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"default_user = {USER}\n"
            f"default_pass = {PASSWORD}\n"
            "loopback_users = none\n"
            "disk_free_limit.absolute = 1MB\n"
            "vm_memory_high_watermark.relative = 0.9\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            HOME=str(self.base / "home"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.base / "rabbit.pid"),
            # A private epmd on loopback, so nothing listens on 4369 for everybody.
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def start(self) -> RabbitNode:
        """Start the node and wait until it accepts an AMQP login."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        out = open(self.base / "log" / "console.log", "ab")  # noqa: SIM115 - lives with the node
        self.proc = subprocess.Popen(
            [self.server],
            env=self._env(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the Erlang VM's helpers
        )
        out.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited early; see {self.base / 'log'}")
            try:
                params = pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=2")
                pika.BlockingConnection(params).close()
                return self
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"rabbitmq-server did not accept AMQP in {_START_TIMEOUT_S:.0f} s; "
                        f"see {self.base / 'log'}"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the node (SIGTERM = graceful shutdown), then its private epmd."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        # epmd daemonises out of the node's process group; ask it to exit (ours: private port).
        epmd = shutil.which("epmd")
        if epmd:
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"],
                env=self._env(),
                capture_output=True,
                timeout=10,
                check=False,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class CutProxy:
    """A TCP relay on 127.0.0.1 to ``127.0.0.1:target_port`` that can play a lost broker.

    ``cut_after(n)``: once clients have sent ``n`` more bytes in total, every relayed connection
    is shut down and new ones are closed on accept, until ``restore()``. The cut falls at a byte
    count, not a time, so a test can place it inside a batch.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._budget: int | None = None  # bytes clients may still send; None: unlimited
        self._down = False
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._budget = nbytes

    def restore(self) -> None:
        with self._lock:
            self._budget, self._down = None, False

    @property
    def down(self) -> bool:
        return self._down

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._cut()

    def _cut(self) -> None:
        with self._lock:
            self._down = True
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv
            except OSError:
                pass
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                cut = False
                if counted:
                    with self._lock:
                        if self._budget is not None:
                            if len(data) >= self._budget:
                                data, cut = data[: self._budget], True
                            self._budget -= len(data)
                dst.sendall(data)
                if cut:
                    self._cut()
                    return
        except OSError:
            pass
        # One side ended: end the other direction too (its pump then closes nothing twice).
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._sockets.discard(src)
        src.close()


def private_broker(prefix: str, conf: str = "") -> Iterator[RabbitNode]:
    """A running private broker (``conf``: lines for its rabbitmq.conf), removed afterwards.
    Skipped when RabbitMQ is not installed, failed on CI (.ci/run installs it)."""
    server = find_server()
    if server is None:
        reason = "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must provide it (.ci/run installs it)")
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix=prefix))
    node = RabbitNode(server, base)
    if conf:
        with open(base / "rabbitmq.conf", "a") as fh:
            fh.write(conf)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitNode]:
    """A running private broker for the whole session."""
    yield from private_broker("octisync-rabbit-")
