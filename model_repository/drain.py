"""Each server's drain state: one file per server, in a private directory, written without following links.

While the file exists the stream model refuses new streams; its content says why ("" for `flowact
drain`, DRAIN_STOPPING / DRAIN_EVACUATE while `flowact serve` stops). A server is named by its metrics
port, which `flowact drain` and `flowact probe` already address (--metrics-url), so two servers on one
host never share a drain: `$FLOWACT_DRAIN_FILE` when set (the chart puts it on the pod's emptyDir),
else `drain-<metrics port>` in `$XDG_RUNTIME_DIR/flowact` or `/tmp/flowact-<uid>`, a directory that
must be this user's and closed to everyone else (0700). `flowact serve` removes its file when it exits.

Torch-free: `flowact drain` and `flowact probe` run as Kubernetes hooks.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from urllib.parse import urlsplit

from flowact.contract import DRAIN_FILE_ENV


def private_dir() -> Path:
    """The per-user state directory, created 0700; refused unless it is a real directory of this user
    that nobody else can enter (another local user could otherwise plant links or drain files)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "flowact" if base else Path("/tmp") / f"flowact-{os.geteuid()}"
    try:
        path.mkdir(mode=0o700, parents=bool(base))
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} is not a private directory of uid {os.geteuid()} (owner uid {info.st_uid}, "
                              f"mode {stat.filemode(info.st_mode)}): remove it, or set ${DRAIN_FILE_ENV}")
    return path


def drain_file(metrics_port: int) -> Path:
    """The drain file of the server whose metrics are on `metrics_port`."""
    explicit = os.environ.get(DRAIN_FILE_ENV)
    return Path(explicit) if explicit else private_dir() / f"drain-{metrics_port}"


def drain_file_of(metrics_url: str) -> Path:
    """The drain file of the server whose metrics are at `metrics_url` (`flowact drain`, `flowact probe`)."""
    return drain_file(urlsplit(metrics_url).port or 80)


def write_state(path: Path, state: str) -> None:
    """Write the drain file atomically, following no link: a fresh file under a random name
    (O_EXCL | O_NOFOLLOW), renamed over the old one (a rename replaces a link, never its target)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_state(path: Path) -> str | None:
    """None: admitting. Else why not ("" for `flowact drain`)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
