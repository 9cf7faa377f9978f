"""The embedded tritonserver that the nvidia-pytriton wheel ships: its backend folder and environment.

Gotchas of the nvidia-pytriton 0.7.0 wheel handled here (measured): its python backend folder has no
stub, so a backend directory is assembled with this interpreter's stub (3.11) beside
libtriton_python.so; the stub finds its environment through `python3` on PATH and needs libpython
on LD_LIBRARY_PATH (without it the server hangs in "loading" forever; flowact.serving.startup
refuses such a launch first).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def libpython_dirs(env: dict[str, str]) -> list[str]:
    """Where the stub's loader looks for libpython: LD_LIBRARY_PATH, then the system folders."""
    extra = [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    return extra + ["/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/local/lib", "/lib/x86_64-linux-gnu",
                    "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu"]


def find_libpython(env: dict[str, str], version: str | None = None) -> str | None:
    version = version or python_version()
    for d in libpython_dirs(env):
        hits = sorted(glob.glob(os.path.join(d, f"libpython{version}.so*")))
        if hits:
            return hits[0]
    return None


def pytriton_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def backend_directory(cache: Path) -> Path:
    """A backends/ folder whose python backend has the stub for this interpreter beside it."""
    src = pytriton_dir()
    py = python_version()
    stub = src / "python_backend_stubs" / py / STUB_BINARY
    if not stub.exists():
        raise RuntimeError(f"the nvidia-pytriton wheel has no python backend stub for Python {py}")
    target = cache / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in (src / "backends" / "python").iterdir():
        if f.is_file() and not (target / f.name).exists():
            shutil.copy2(f, target / f.name)
    if not (target / stub.name).exists():
        shutil.copy2(stub, target / stub.name)
    return target.parent


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the stub's python3
    libpython = str(Path(sys.base_prefix) / "lib")
    wheel_libs = str(pytriton_dir().parent.parent / "nvidia_pytriton.libs")  # the copied stub's libcudart
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libpython, wheel_libs, env.get("LD_LIBRARY_PATH")) if p)
    return env
