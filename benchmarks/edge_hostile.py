"""The WebRTC edge under attack, measured (issue 19): a tiny server, `flowact web` in front of it as a
process, one live viewer watching throughout, and bursts of what an outside tester sent.

    python -m flowact.benchmarks.edge_hostile --out benchmarks/results/edge_hostile.json

Reports the edge's RSS (idle, peak, settled) under 12 concurrent worst-case uploads and under a burst of
hostile offers, the live viewer's longest gap between frames during each burst, how long a hung server
(SIGSTOP) takes to end its sessions, and how long after a restarted server is ready the next session is
answered and shows its first frame. The tools here (the edge process, offers, raw uploads, images) are
what tests/test_edge_hostile.py uses too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from flowact.contract import DRAIN_FILE_ENV, WEB_SESSIONS_PATH


class EdgeProcess:
    """`flowact web` as a process on a free loopback port, with its log in a file."""

    def __init__(self, server_url: str, log_path: Path, *args: str, wait_s: float = 60.0):
        from flowact.serving.processes import free_ports

        (self.port,) = free_ports(1)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_file = open(self.log_path, "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "flowact.cli", "web", "--url", server_url,
                                      "--port", str(self.port), *args], stdout=self.log_file, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + wait_s
        while self.request("GET", "/healthz")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flowact web did not come up:\n{self.log()}")
            time.sleep(0.3)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """-> (status, headers, body); 0 when nothing answers."""
        request = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()
        except OSError:
            return 0, {}, b""

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log_file.close()
        return self.log()


def make_offer() -> str:
    """A viewer's offer as the page makes it: audio sendrecv, video recvonly, a data channel."""
    from aiortc import RTCPeerConnection

    async def offer() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="recvonly")
        pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(offer())


def offer_with(sdp: str, duplicate_mid: bool = False, video: str | None = None, extra_media: int = 0) -> str:
    """A valid offer made hostile: every section with the same mid, the video's direction changed, or
    `extra_media` more (tiny) audio sections."""
    if duplicate_mid:
        sdp = re.sub(r"^a=mid:.*$", "a=mid:0", sdp, flags=re.MULTILINE)
    if video is not None:
        head, _, tail = sdp.partition("m=video")
        sdp = head + "m=video" + tail.replace("a=recvonly", f"a={video}", 1)
    if extra_media:
        sdp = sdp + "m=audio 0 X 0\r\n" * extra_media  # 15 bytes each: 4,000 fit in 60 kB
    return sdp


def raw_post(port: int, path: str, body: bytes, ctype: str, headers: dict, declared: int | None = None,
             segment: int | None = None, pause_s: float = 0.0, stall: bool = False, leave: bool = False):
    """POST over a plain socket, the body in `segment`-byte writes `pause_s` apart (many TCP segments);
    `stall`: then send nothing more and wait for the answer; `leave`: close without reading. -> (status, body)."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {ctype}",
            f"Content-Length: {declared if declared is not None else len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        step = segment or len(body) or 1
        for i in range(0, len(body), step):
            s.sendall(body[i:i + step])
            if pause_s:
                time.sleep(pause_s)
        if leave:
            return 0, b""
        reply = b""
        while chunk := s.recv(65536):  # until the whole answer is in (the edge may linger reading the body)
            reply += chunk
            head, _, rest = reply.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            if length and len(rest) >= int(length.group(1)):
                break
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return status, reply.partition(b"\r\n\r\n")[2]


def big_png(side: int, noise: bool = True) -> bytes:
    """A side x side RGB PNG: noise (a photo-sized file, ~3 bytes a pixel) or a smooth gradient (small
    file, the same pixels to decode)."""
    rng = np.random.default_rng(side)
    if noise:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    else:
        ramp = np.linspace(0, 255, side, dtype=np.uint8)
        pixels = np.stack([np.broadcast_to(ramp, (side, side)), np.broadcast_to(ramp[:, None], (side, side)),
                           np.full((side, side), 90, np.uint8)], axis=-1)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def big_jpeg(kilobytes: int) -> bytes:
    """A phone-photo-like JPEG of about this many kilobytes (noisy 4:3 content, quality 95)."""
    width = int((kilobytes * 1000 / 0.9 * 4 / 3) ** 0.5)  # ~0.9 bytes a pixel for noise at q95
    rng = np.random.default_rng(kilobytes)
    pixels = rng.integers(0, 256, (width * 3 // 4, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file that decodes to width x height pixels (one colour compresses to almost nothing)."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    return out.getvalue()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class Watch:
    """A live viewer on its own thread and event loop: its frames' arrival times, for gaps."""

    def __init__(self, base: str, token: str | None = None):
        from flowact.web.viewer import Viewer

        self.viewer = Viewer(base, None, keep_frames=False, token=token)
        self.loop = asyncio.new_event_loop()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while len(self.viewer.video) < 25:
            if time.monotonic() > deadline:
                raise RuntimeError("the watching viewer got no video")
            time.sleep(0.1)

    def _run(self) -> None:
        async def main():
            await self.viewer.connect()
            while not self.stop_event.is_set():
                await asyncio.sleep(0.05)
            await self.viewer.close()

        self.loop.run_until_complete(main())

    def longest_gap(self, since: float, until: float) -> float:
        times = [t for t, _ in list(self.viewer.video) if since - 1.0 <= t <= until + 1.0]
        return float(np.max(np.diff(times))) if len(times) > 1 else float("inf")

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(15)


def burst(edge: EdgeProcess, requests: list, label: str, watch: Watch | None = None, settle_s: float = 2.0) -> dict:
    """Send every (method, path, body, headers) at once from threads; the edge's RSS sampled every 20 ms
    until `settle_s` after the last answer; the watching viewer's longest frame gap meanwhile."""
    idle, peak, statuses = rss_mb(edge.pid), [0.0], []
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(edge.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=lambda r=r: statuses.append(edge.request(*r)[0])) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    t1 = time.monotonic()
    time.sleep(settle_s)
    done.set()
    sampler.join()
    result = {"what": label, "requests": len(requests), "statuses": dict(collections.Counter(statuses)),
              "seconds": round(t1 - t0, 2), "rss_idle_mb": round(idle), "rss_peak_mb": round(peak[0]),
              "rss_settled_mb": round(rss_mb(edge.pid))}
    if watch is not None:
        result["viewer_longest_frame_gap_ms"] = round(1000 * watch.longest_gap(t0, t1))
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    from flowact.serving.repository import RepositoryOptions, build_embedded_repository
    from flowact.serving.processes import free_ports
    from flowact.serving.server import TritonServer
    from flowact.web.viewer import Viewer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--outage", type=float, default=35.0, help="seconds the server is down before its restart")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="edge-hostile-"))
    repo = build_embedded_repository("tiny", tmp / "repo", opts=RepositoryOptions(capacity=8, idle_ttl_s=30.0))
    http, grpc, metrics = free_ports(3)
    make = lambda: TritonServer(repo, grpc, http, metrics, work_dir=tmp / "triton",  # noqa: E731
                                extra_env={DRAIN_FILE_ENV: str(tmp / "draining")})
    server = make().start(timeout_s=120)
    edge = EdgeProcess(f"127.0.0.1:{grpc}", tmp / "edge.log", "--max-sessions", "4", "--no-failover")  # one server
    results: dict = {"machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start", "bursts": []}
    try:
        watch = Watch(edge.base)
        worst = [("POST", "/v1/images", big_png(4096, noise=False), {"Content-Type": "image/png"})] * 12
        results["bursts"].append(burst(edge, worst, "12 concurrent 4096x4096 PNG uploads (the largest that decode)", watch))
        jpegs = [("POST", "/v1/images", big_jpeg(1700), {"Content-Type": "image/jpeg"})] * 12
        results["bursts"].append(burst(edge, jpegs, "12 concurrent 1.7 MB JPEG uploads", watch))
        bombs = [("POST", "/v1/images", bomb_png(6000, 6660), {"Content-Type": "image/png"})] * 12
        results["bursts"].append(burst(edge, bombs, "12 concurrent 6000x6660 PNG bombs (155 kB -> 40 Mpixel)", watch))
        good = make_offer()
        hostile = [offer_with(good, extra_media=4000), "x" * (60 << 10), good.replace("v=0", "v=0\r\n" + "a=x\r\n" * 9000),
                   offer_with(good, duplicate_mid=True), offer_with(good, video="inactive")]
        offers = [("POST", WEB_SESSIONS_PATH, s.encode() if isinstance(s, str) else s, {"Content-Type": "application/sdp"})
                  for s in hostile * 10] + [("POST", WEB_SESSIONS_PATH, b"v=0\r\n" + b"m" * (5 << 20),
                                             {"Content-Type": "application/sdp"})] * 4
        results["bursts"].append(burst(edge, offers, "54 hostile offers at once (4,001 m-lines, 60 kB junk, "
                                                     "9,000 lines, duplicate mids, inactive video, 5 MiB)", watch))
        watch.close()

        async def hung() -> float:  # a live session while tritonserver is stopped (SIGSTOP)
            v = await Viewer(edge.base, None, keep_frames=False).connect()
            while len(v.video) < 25:
                await asyncio.sleep(0.05)
            os.killpg(server.process.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                while not any(m.get("type") == "error" for m in v.messages) and time.monotonic() - t0 < 30:
                    await asyncio.sleep(0.02)
                return time.monotonic() - t0
            finally:
                os.killpg(server.process.pid, signal.SIGCONT)
                await v.close(delete=False)

        results["hung_server_session_ended_s"] = round(asyncio.run(hung()), 2)
        print(f"hung server: session ended after {results['hung_server_session_ended_s']} s", flush=True)
        server.stop()
        time.sleep(args.outage)
        server = make().start(timeout_s=120)
        ready = time.monotonic()

        async def first_session() -> tuple[float, float]:
            v = await Viewer(edge.base, None, keep_frames=False).connect()
            answered = time.monotonic() - ready
            while not v.video:
                await asyncio.sleep(0.005)
            shown = time.monotonic() - ready
            await v.close()
            return answered, shown

        answered, shown = asyncio.run(first_session())
        results["after_outage"] = {"outage_s": args.outage, "server_ready_to_answer_s": round(answered, 3),
                                   "server_ready_to_first_frame_s": round(shown, 3)}
        print(json.dumps(results["after_outage"]), flush=True)
    finally:
        edge.stop()
        server.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
