"""Launch, watch and stop tritonserver: the binary that the nvidia-pytriton wheel ships (the embedded
server; its backend folder and environment: flowact.serving.backend) or another one.

The server runs in its own process group and is stopped with SIGTERM, waiting for the whole group
(flowact.serving.processes), so no stub process or /dev/shm region is left behind.

Stub watchdog. Measured on Triton 2.51: when a python stub process dies (OOM kill, crash), Triton
does not restart it; server and model readiness stay 200 while every request to that model fails
with "Stub process '<model>_0_0' is not healthy.", and its streams' state is gone. So the
launcher watches its stubs and, when one dies, logs it and stops the server (`on_stub_exit="stop"`:
`flowact serve` then exits non-zero and its supervisor, e.g. Kubernetes, restarts it) or restarts
it in place (`"restart"`). Clients see a clear error and resume from their last snapshot.

Launcher death. tritonserver runs under a guard process (guard.py), the leader of its process group,
which takes the group down when the launcher dies by any signal (even SIGKILL of the launcher's
group, which does not reach the server's own session).

Startup failures name their cause first (flowact.serving.startup): the configuration is checked
before launching (ports free, snapshot key long enough, libpython findable) and a server that exits
or stalls has the error lines of its log pulled to the top of the exception.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flowact.contract import (ADMIN_KEY_ENV, ADMIN_KEY_NAME, ARTIFACTS_DIR, DEFAULT_GRPC_PORT, DEFAULT_HOST,
                              DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, LAUNCHER_GUARD_KILL_S)
from flowact.serving.backend import backend_directory, pytriton_dir, server_env
from flowact.serving.processes import Stub, find_stubs, group_alive, group_processes
from flowact.serving.startup import FATAL_LINE, StartupError, cause_lines, preflight

STUB_EXIT_POLICIES = ("stop", "restart", "ignore")
SERVER_LINGER_S = 3.0  # how long a stopping tritonserver may outlive its stubs before SIGKILL
# Protocols no client needs: restricted behind a key only the operator knows.
RESTRICTED_PROTOCOLS = "model-repository,model-config,shared-memory,logging,trace,statistics"
REDACTED = "<admin-key>"


GUARD = Path(__file__).with_name("guard.py")


@dataclass
class TritonServer:
    repository: Path
    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    host: str = DEFAULT_HOST  # loopback unless told otherwise
    work_dir: Path = Path(ARTIFACTS_DIR) / "triton"  # the assembled backend directory (embedded binary)
    binary: Path | None = None  # another tritonserver (e.g. /opt/tritonserver/bin/tritonserver in the NGC image)
    extra_args: list[str] = field(default_factory=list)  # passed to tritonserver as they are (TLS, ...)
    extra_env: dict[str, str] = field(default_factory=dict)
    echo_log: bool = False  # also copy the server log to our stdout (containers: `kubectl logs`)
    admin_key: str = field(default_factory=lambda: secrets.token_hex(16))
    on_stub_exit: str = "stop"  # a python stub died: "stop" the server, "restart" it, or "ignore" (STUB_EXIT_POLICIES)
    watch_period_s: float = 0.5
    process: subprocess.Popen | None = None  # the guard (guard.py), leader of the server's process group
    log_lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))
    stubs: dict[int, "Stub"] = field(default_factory=dict)  # pid -> stub, found when the server became ready
    restarts: int = 0  # in-place restarts after a stub died
    failures: list[str] = field(default_factory=list)  # what the watchdog saw, in order
    _watchdog_stop: threading.Event = field(default_factory=threading.Event)
    _lifecycle: threading.RLock = field(default_factory=threading.RLock)
    _guard_fd: int | None = None  # write end of the guard's pipe: closed when this process dies
    _log_reader: threading.Thread | None = None

    def __post_init__(self):
        if self.on_stub_exit not in STUB_EXIT_POLICIES:
            raise ValueError(f"on_stub_exit must be one of {STUB_EXIT_POLICIES}, got {self.on_stub_exit!r}")

    def command(self) -> list[str]:
        restricted = f"{RESTRICTED_PROTOCOLS}:{ADMIN_KEY_NAME}={self.admin_key}"
        if self.binary is None:
            launch = [str(pytriton_dir() / "bin" / "tritonserver"),
                      f"--backend-directory={backend_directory(self.work_dir.resolve())}"]
        else:
            launch = [str(self.binary)]
        return [*launch, f"--model-repository={Path(self.repository).resolve()}",
                "--model-control-mode=none",  # no client can load code
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                "--allow-metrics=true", "--allow-gpu-metrics=false", f"--metrics-address={self.host}",
                f"--metrics-port={self.metrics_port}",
                f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}",
                "--backend-config=python,shm-default-byte-size=33554432",
                "--backend-config=python,shm-growth-byte-size=33554432",
                "--exit-timeout-secs=10", "--log-verbose=0", *self.cuda_memory_pool(), *self.extra_args]

    def rendered(self) -> dict:
        """What the repository was rendered for (its repository.json; {} for one made by hand)."""
        meta = Path(self.repository) / "repository.json"
        return json.loads(meta.read_text()) if meta.exists() else {}

    def cuda_memory_pool(self) -> list[str]:
        """The CUDA memory pool the repository was sized for (a GPU repository's repository.json)."""
        pool = self.rendered().get("cuda_memory_pool")
        return [] if pool is None else [f"--cuda-memory-pool-byte-size={pool['gpu']}:{pool['bytes']}"]

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        with self._lifecycle:
            self._start(timeout_s)
        return self

    def failure(self, what: str) -> str:
        """`what` happened: the log's error lines first, then the log tail."""
        if self._log_reader is not None:
            self._log_reader.join(timeout=2)  # the last lines of an exited server
        causes = cause_lines(self.log_lines)
        cause = "\n".join(f"  {line}" for line in causes) if causes else "  (no error line in the log)"
        return f"{what}; cause, from {self.log_path}:\n{cause}\nlog tail:\n{self.log_tail(20)}"

    def _start(self, timeout_s: float) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = server_env() | self.extra_env
        env.pop(ADMIN_KEY_ENV, None)  # the server and its python stubs have no use for the key
        preflight(env, self.host, [("gRPC", self.grpc_port, "--grpc-port"), ("HTTP", self.http_port, "--http-port"),
                                   ("metrics", self.metrics_port, "--metrics-port")],
                  self.rendered().get("device") or "cpu", embedded=self.binary is None)
        read_fd, self._guard_fd = os.pipe()
        guard = [sys.executable, "-I", str(GUARD), str(read_fd), str(LAUNCHER_GUARD_KILL_S), "--", *self.command()]
        try:
            self.process = subprocess.Popen(guard, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True,  # own process group: the stubs stay in it
                                            pass_fds=(read_fd,))
        finally:
            os.close(read_fd)
        self._log_reader = threading.Thread(target=self._read_log, args=(self.process.stdout,), daemon=True)
        self._log_reader.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                message = self.failure(f"tritonserver exited with code {code} while starting")
                self.stop()
                raise StartupError(message)
            fatal = next((line for line in list(self.log_lines) if FATAL_LINE.search(line)), None)
            if fatal is not None:
                message = self.failure(f"tritonserver cannot load a model ({fatal.strip()})")
                self.stop()
                raise StartupError(message)
            if self.ready():
                self.stubs = find_stubs(self.process.pid)
                self._watchdog_stop = threading.Event()
                if self.on_stub_exit != "ignore":
                    threading.Thread(target=self._watch, args=(self._watchdog_stop, timeout_s), daemon=True).start()
                return
            time.sleep(0.25)
        message = self.failure(f"tritonserver not ready after {timeout_s:.0f} s")
        self.stop()
        raise TimeoutError(message)

    def dead_stubs(self) -> list["Stub"]:
        """Stubs found at readiness that have exited since (Triton would not restart them)."""
        return [stub for stub in self.stubs.values() if not stub.alive()]

    def _watch(self, stop: threading.Event, timeout_s: float) -> None:
        while not stop.wait(self.watch_period_s):
            dead = self.dead_stubs()
            if not dead:
                continue
            with self._lifecycle:
                if stop.is_set():  # stopped on purpose meanwhile
                    return
                names = ", ".join(f"{s.model} (pid {s.pid})" for s in dead)
                action = "restarting the server" if self.on_stub_exit == "restart" else "stopping the server"
                message = (f"flowact: python stub of model {names} exited; Triton does not restart stubs and its "
                           f"requests would fail from now on: {action}")
                self.failures.append(message)
                self.log_lines.append(message)
                self.stop()
                if self.on_stub_exit == "restart":
                    self.restarts += 1
                    try:
                        self._start(timeout_s)
                    except (RuntimeError, TimeoutError) as e:
                        self.failures.append(f"flowact: restart failed: {e}")
                        self.log_lines.append(self.failures[-1])
                return  # a restarted server has its own watchdog

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _read_log(self, pipe) -> None:
        with open(self.work_dir / "tritonserver.log", "w") as log:
            for raw in pipe:
                line = raw.decode(errors="replace").rstrip("\n").replace(self.admin_key, REDACTED)  # never logged
                self.log_lines.append(line)
                log.write(line + "\n")
                log.flush()
                if self.echo_log:
                    print(line, flush=True)

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tritonserver.log"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.log_lines)[-lines:]) or "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the process group, wait for every member, and only then SIGKILL what remains."""
        with self._lifecycle:
            self._watchdog_stop.set()
            self._stop(timeout_s)

    def _stop(self, timeout_s: float) -> None:
        if self.process is None:
            return
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        # Measured under `flowact serve` with client gRPC streams still open: tritonserver logs "Exit timeout
        # expired. Exiting immediately." and then neither it nor its stubs exit. Past its exit timeout
        # (plus the linger) nothing is left to wait for: SIGKILL, then unlink the stubs' regions below.
        deadline = time.monotonic() + min(timeout_s, self.exit_timeout_s() + SERVER_LINGER_S)
        alone_since = None
        while time.monotonic() < deadline and group_alive(pgid):
            self.process.poll()  # reap the guard (it exits once tritonserver has)
            # Measured on 2.51: while a client holds a gRPC stream open, tritonserver never exits, even
            # after its exit timeout ("Exiting immediately"). Once its stubs are gone nothing of
            # value is left to lose: a lingering server alone in its group (with its guard) gets SIGKILL.
            if self.process.returncode is None and len([p for p in group_processes(pgid) if p.pid != pgid]) == 1:
                alone_since = alone_since or time.monotonic()
                if time.monotonic() - alone_since > SERVER_LINGER_S:
                    break
            else:
                alone_since = None
            time.sleep(0.1)
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        self.process = None
        if self._guard_fd is not None:
            os.close(self._guard_fd)
            self._guard_fd = None
        for stub in self.stubs.values():  # a killed stub cannot remove its shared memory region
            (Path("/dev/shm") / stub.shm_region).unlink(missing_ok=True)
        self.stubs = {}

    def exit_timeout_s(self) -> float:
        """tritonserver's --exit-timeout-secs (the last one given wins, as in Triton)."""
        values = [a.split("=", 1)[1] for a in self.command() if a.startswith("--exit-timeout-secs=")]
        return float(values[-1]) if values else 30.0

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
