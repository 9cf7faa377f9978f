"""Why a tritonserver launch cannot work, or did not: checks before it runs, and the causes in its log.

`preflight` refuses a launch that cannot work, naming why, before tritonserver runs (a port in use,
a snapshot key too short, a repository rendered for a GPU that is not here, no libpython for the
python stub). `cause_lines` pulls the error lines of a server that exited or stalled while starting
out of its log, so that a StartupError begins with the cause (e.g. the model that failed to load).
"""

from __future__ import annotations

import re
import socket

from flowact.contract import ADMIN_KEY_ALPHABET, ADMIN_KEY_MIN_CHARS, SNAPSHOT_KEY_ENV
from flowact.serving.backend import find_libpython, python_version

# Log lines that state why a server failed (Triton's error lines start with E and the date: E1201 ...).
CAUSE_LINE = re.compile(r"^E\d{4} |error|failed|unavailable|cannot open shared object|exception", re.IGNORECASE)
NOISE_LINE = re.compile(r"cuda|nvml|dcgm|gpu metrics|pinned memory|cupti", re.IGNORECASE)  # harmless on CPU
MODEL_LOAD_LINE = re.compile(r"failed to load '")
# A stalled load that never ends by itself (e.g. the stub cannot load libpython: Triton waits forever).
FATAL_LINE = re.compile(r"error while loading shared libraries|cannot open shared object file")


class StartupError(RuntimeError):
    """The server did not start; the message begins with the cause."""


def cause_lines(lines, limit: int = 8) -> list[str]:
    """The lines of a server log that state an error, in order, without repeats or CPU noise."""
    found = []
    for line in lines:
        line = line.strip()
        noise = NOISE_LINE.search(line) and not MODEL_LOAD_LINE.search(line)  # "unsupported gpu id" is a cause
        if CAUSE_LINE.search(line) and not noise and line not in found:
            found.append(line)
    return found[-limit:]


def check_admin_key(key: str) -> str:
    """An operator's admin key, validated (the error never contains the key)."""
    if len(key) < ADMIN_KEY_MIN_CHARS:
        raise ValueError(f"the admin key must have at least {ADMIN_KEY_MIN_CHARS} characters (got {len(key)})")
    bad = sorted({c for c in key if c not in ADMIN_KEY_ALPHABET})
    if bad:
        raise ValueError(f"the admin key may hold only letters, digits and {ADMIN_KEY_ALPHABET[62:]} "
                         f"({len(bad)} other character(s) found)")
    return key


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener blocks the bind; TIME_WAIT does not
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def preflight(env: dict[str, str], host: str, ports: list[tuple[str, int, str]], device: str, embedded: bool) -> None:
    """Refuse a launch that cannot work, naming why. `ports`: (what, port, flag), e.g. ("gRPC", 8001, "--grpc-port");
    `device`: where the repository's models run; `embedded`: the wheel's binary, whose stub needs libpython."""
    for what, port, flag in ports:
        if port_in_use(host, port):
            raise StartupError(f"{what} port {port} on {host} is already in use: stop what listens there "
                               f"or choose another {flag}")
    if env.get(SNAPSHOT_KEY_ENV):
        from flowact.snapshot import key_from_env

        try:
            key_from_env(env)
        except ValueError as e:
            raise StartupError(str(e)) from None
    if device.startswith("cuda"):  # the stream model's device must exist here, or every model fails to load
        import torch

        if torch.cuda.device_count() <= (torch.device(device).index or 0):
            seen = (f"{torch.cuda.device_count()} CUDA device(s) visible" if torch.version.cuda
                    else f"torch {torch.__version__} is built without CUDA")
            raise StartupError(f"the repository's models run on {device}, but {seen} here: serve it on a GPU "
                               f"machine, or render it with --device cpu (target torch)")
    if embedded and find_libpython(env) is None:
        raise StartupError(f"libpython{python_version()}.so not found in LD_LIBRARY_PATH or the system library "
                           f"folders: the python backend stub needs it (install this interpreter's shared library, "
                           f"or put its folder on LD_LIBRARY_PATH)")
