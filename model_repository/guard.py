"""The launcher's guard: runs tritonserver and takes it down when the launcher dies, by any signal.

    python guard.py FD KILL_S -- tritonserver ARGS...

The launcher starts this script as the leader of a new process group (tritonserver and its python
stubs join that group) and keeps the write end of a pipe whose read end is FD. Nothing else holds
the write end, so EOF on FD means the launcher is gone: an OOM kill, `kill -9` of its process
group, a crash. The guard then SIGTERMs the group, waits up to KILL_S seconds for the stubs to exit,
SIGKILLs what remains and unlinks the stubs' /dev/shm regions (a killed stub cannot).

Why not PR_SET_PDEATHSIG on tritonserver: it fires when the launcher *thread* that started the
server exits (the stub watchdog restarts the server from a thread that then ends), and a SIGTERMed
tritonserver that still holds client gRPC streams does not exit by itself.

While the launcher lives, the guard only waits for tritonserver and exits with its status; SIGTERM
to the group (the launcher's normal stop) is ignored by the guard so that it can report that status.
Standard library only: it starts in milliseconds and imports nothing of the project.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

SHM_PREFIX = "triton_python_backend_shm_region"
STUB_BINARY = "triton_python_backend_stub"


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def stub_regions(pids: list[int]) -> set[str]:
    """The /dev/shm regions of the python stubs among pids (the stub's argv[2] names its region)."""
    regions = set()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 3 and argv[0].decode(errors="replace").endswith(STUB_BINARY):
            name = Path(argv[2].decode(errors="replace")).name
            if name.startswith(SHM_PREFIX):
                regions.add(name)
    return regions


def take_down(server: subprocess.Popen, kill_s: float) -> None:
    """The launcher is gone: stop the whole group, at most kill_s seconds of grace, then SIGKILL."""
    me, pgid = os.getpid(), os.getpgid(0)
    others = [p for p in group_pids(pgid) if p != me]
    regions = stub_regions(others)
    os.killpg(pgid, signal.SIGTERM)  # the guard ignores it
    deadline = time.monotonic() + kill_s
    while time.monotonic() < deadline:
        server.poll()
        alive = [p for p in group_pids(pgid) if p != me]
        stubs_alive = stub_regions(alive)
        if not alive or (not stubs_alive and server.returncode is not None):
            break
        if not stubs_alive and len(alive) == 1:  # tritonserver alone: open gRPC streams hold it forever
            break
        time.sleep(0.05)
    for pid in group_pids(pgid):
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    server.wait()
    for name in regions:
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass


def main(argv: list[str]) -> int:
    fd, kill_s, sep, *command = argv
    assert sep == "--" and command, "usage: guard.py FD KILL_S -- COMMAND..."
    fd, kill_s = int(fd), float(kill_s)
    os.set_inheritable(fd, False)
    server = subprocess.Popen(command)  # same process group and stdout as the guard
    # Ignored only now: an ignored disposition would be inherited by tritonserver across exec.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's stop: keep reporting the server's status
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        if server.poll() is not None:
            code = server.returncode
            return code if code >= 0 else 128 - code
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready and not os.read(fd, 64):  # EOF: the launcher died
            take_down(server, kill_s)
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
