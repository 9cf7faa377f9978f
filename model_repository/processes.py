"""A tritonserver's processes: its python stubs, its process group, their memory and shared memory.

The server runs in its own process group (its guard the leader, tritonserver and one python stub per
python model instance below it): stopping waits for the whole group, the watchdog looks for dead
stubs, and tests and benchmarks measure the group's memory and check that nothing is left behind.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from flowact.serving.backend import STUB_BINARY

SHM_PREFIX = "triton_python_backend_shm_region"


def shm_regions() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob(f"{SHM_PREFIX}*")} if shm.exists() else set()


@dataclass(frozen=True)
class Stub:
    """One python backend stub process (one per python model instance)."""

    model: str
    shm_region: str
    process: object  # psutil.Process: its identity (pid, start ticks since boot) ignores wall-clock steps

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """Not a creation time compared in wall-clock seconds: that moves when the clock is stepped
        (/proc/stat btime), and CI once saw every stub of two servers 'die' at the same instant."""
        import psutil

        try:
            return self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


def find_stubs(pgid: int) -> dict[int, Stub]:
    """The python stubs in a server's process group: pid -> Stub (model name from the model.py path)."""
    import psutil

    stubs = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        try:
            if len(cmd) >= 3 and cmd[0].endswith(STUB_BINARY) and os.getpgid(proc.pid) == pgid:
                model = Path(cmd[1]).parent.parent.name  # <repo>/<model>/<version>/model.py
                stubs[proc.pid] = Stub(model, Path(cmd[2]).name, proc)
        except (ProcessLookupError, PermissionError):
            continue
    return stubs


def group_processes(pgid: int) -> list:
    """psutil.Process of every live member of a process group (the server and its stubs)."""
    import psutil

    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def group_rss(pgid: int, proportional: bool = False) -> int:
    """Resident memory of a process group in bytes (tritonserver and its stubs).

    RSS counts pages shared between processes once per process: the python backend's shared
    memory regions (mapped by the server and by a stub) count twice. `proportional=True` sums PSS
    instead (shared pages split among their users): the group's real footprint."""
    import psutil

    total = 0
    for proc in group_processes(pgid):
        try:
            total += proc.memory_full_info().pss if proportional else proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def free_ports(n: int) -> list[int]:
    """n TCP ports free on loopback right now (tests and benchmarks start servers side by side)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
