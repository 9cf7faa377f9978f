"""The project installed the way the Dockerfile installs it (`pip install .`, not editable) works.

An editable install reads every data file from the checkout, so a file missing from the wheel's
package-data goes unnoticed until someone installs the wheel (the image does). This test builds
and installs the wheel into a fresh virtual environment and runs `flowact demo --preset tiny` from
an empty directory.

Cheap: the fresh venv has no packages of its own; a .pth line appends this project's venv
site-packages (torch, tritonclient, pytriton, ...) to its path, after its own site-packages, so
`pip install --no-deps` installs only flowact itself; the wheel is built with this venv's setuptools
(`--no-build-isolation`, nothing downloaded) when it has one.
The source is copied as the Dockerfile copies it (pyproject.toml and the package folders), so the
build sees nothing else of the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the Dockerfile copies into /opt/flowact/src before `pip install /opt/flowact/src` (read from it,
# so a package folder the Dockerfile forgets fails the wheel build here).
SOURCES = tuple(line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines()
                if line.startswith("COPY ") and line.split()[-1].startswith("/opt/flowact/src"))
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "results")


def run(args, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel of this project installed (not editable); returns its bin/."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORE)
        else:
            shutil.copy2(path, src / name)
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = tmp / "wheels"
    try:  # build with this venv's setuptools (offline, fast); else pip fetches pyproject's build requirements
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", wheels, src], cwd=tmp,
        env=dict(os.environ, PIP_NO_INPUT="1"))
    wheel = next(wheels.glob("flowact_triton-*.whl"))
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
         "--no-index", wheel], cwd=tmp)
    return venv / "bin"


def test_wheel_carries_every_runtime_file(installed):
    wheel = next((installed.parent.parent / "wheels").glob("flowact_triton-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("flowact/serving/vae_decoder/1/model.py", "flowact/serving/stream/1/model.py",
                   "flowact/samples/reference.png", "flowact/samples/speech.wav",
                   "flowact/checkpoints/tiny/preset.json", "flowact/checkpoints/tiny/denoiser.safetensors",
                   "flowact/checkpoints/cpu/preset.json", "flowact/checkpoints/cpu/denoiser-00001-of-00002.safetensors"):
        assert needed in names, needed
    assert not [n for n in names if n.endswith(".png") and "checkpoints" in n]  # training plots stay out


def test_demo_runs_from_the_installed_wheel_in_any_directory(installed, tmp_path):
    from flowact.serving.processes import free_ports

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWACT_", "PYTHON"))}
    env["FLOWACT_DRAIN_FILE"] = str(tmp_path / "draining")
    probe = run([installed / "python", "-c",
                 "import flowact, flowact.serving.repository as r, flowact.networks as n; "
                 "print(flowact.__file__); print(r.__file__); print(n.shipped_checkpoint('tiny'))"], cwd=tmp_path, env=env)
    site = str(installed.parent / "lib")
    for line in probe.stdout.split():  # the installed copy, not the checkout
        assert line.startswith(site) and not line.startswith(str(REPO)), probe.stdout
    http, grpc, metrics = free_ports(3)
    demo = run([installed / "flowact", "demo", "--preset", "tiny", "--out", "demo.mp4", "--grpc-port", grpc,
                "--http-port", http, "--metrics-port", metrics], cwd=tmp_path, env=env, timeout=600)
    assert f"weights: {site}" in demo.stdout and "flowact/checkpoints/tiny" in demo.stdout, demo.stdout
    assert "server stopped" in demo.stdout and (tmp_path / "demo.mp4").stat().st_size > 10_000
    models = tmp_path / "artifacts" / "tiny" / "repository"
    assert (models / "vae_decoder" / "1" / "model.py").is_file() and (models / "stream" / "1" / "model.py").is_file()
