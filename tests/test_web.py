"""The WebRTC edge (`flowact web`): its timelines on their own, then the real thing: a tiny-preset
tritonserver, `flowact web` in front of it as a process, an aiortc client following the documented
signaling contract, and headless Debian chromium whose fake microphone plays the shipped speech."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import metrics, url, wait_for
from flowact.contract import (ACTIVE_STREAMS, WEB_AUDIO_DELAY, WEB_METRICS, WEB_MOUTH_LATENCY, WEB_SESSIONS_ACTIVE,
                              WEB_SESSIONS_PATH, WEB_TTFF)
from flowact.media import REFERENCE_IMAGE, SPEECH_WAV
from flowact.presets import CHUNK_SECONDS, SAMPLE_RATE, SAMPLES_PER_CHUNK
from flowact.serving.cli import metric_value
from flowact.serving.processes import free_ports
from flowact.web.app import MAX_IMAGE_BYTES, EdgeMetrics, Refused, decode_image
from flowact.web.timeline import (IDLE_AFTER_CHUNKS, MIN_JITTER_BUFFER_S, ChunkAssembler, Conditioning, ControlError,
                                  JitterSizer)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOT_ENV = "FLOWACT_WEB_SCREENSHOT"  # where the browser test saves its screenshot (the README's)


# --- the timelines, no network ------------------------------------------------------------------


def test_chunks_follow_the_clock_and_silence_stands_in_for_late_input():
    a = ChunkAssembler(slack_s=0.1)
    t0 = 100.0
    second = np.full(SAMPLE_RATE, 0.5, dtype=np.float32)
    chunks = a.push(second, t0 + 1.0)  # 1 s of input, arriving at once: two whole chunks
    assert [c.index for c in chunks] == [0, 1] and a.origin == pytest.approx(t0)
    assert all(c.filled == 0 and c.complete_at == t0 + 1.0 for c in chunks)
    assert a.fill(t0 + 1.05) == []  # within the slack: wait for input
    chunks = a.fill(t0 + 2.0)  # nothing came for 1 s: silence up to now - slack
    assert [c.index for c in chunks] == [2]  # samples 15360..23040 complete, the rest pending
    assert a.written == int((2.0 - 0.1) * SAMPLE_RATE)
    assert chunks[0].filled == SAMPLES_PER_CHUNK - (SAMPLE_RATE - 2 * SAMPLES_PER_CHUNK) and chunks[0].rms < 0.5
    debt = a.debt
    a.push(np.ones(debt + 100, dtype=np.float32), t0 + 2.01)  # the late input: dropped, only the rest counts
    assert a.debt == 0 and a.written == int(1.9 * SAMPLE_RATE) + 100


def test_no_input_at_all_still_makes_chunks_every_0_48_s():
    a = ChunkAssembler(slack_s=0.1)
    assert a.fill(5.0) == []  # no origin yet: nothing
    a.start(10.0)
    made = [c for k in range(1, 101) for c in a.fill(10.0 + k * 0.04)]  # 4 s of ticks
    assert len(made) == int((4.0 - 0.1) / CHUNK_SECONDS)
    assert all(c.filled == SAMPLES_PER_CHUNK and c.rms == 0 for c in made)
    gaps = np.diff([c.complete_at for c in made])
    assert np.all(np.abs(gaps - CHUNK_SECONDS) <= 0.04 + 1e-9)


def test_conditioning_auto_goes_idle_after_silence_and_obeys_the_viewer():
    from flowact.web.timeline import Chunk

    loud = Chunk(0, np.full(SAMPLES_PER_CHUNK, 0.2, np.float32), 0.0, 0)
    quiet = Chunk(0, np.zeros(SAMPLES_PER_CHUNK, np.float32), 0.0, 0)
    c = Conditioning()
    assert c.next(loud) == ("speaking", None)
    said = [c.next(quiet) for _ in range(IDLE_AFTER_CHUNKS + 1)]
    assert said[-1] == ("idle", None) and said[0] == ("speaking", None)  # a short pause is not idle
    assert c.next(loud) == ("speaking", None)
    c.apply({"behaviour": "listening"})
    assert c.next(loud) == ("listening", None)
    c.apply({"prompt": "nods slowly"})
    assert c.next(quiet) == (None, "nods slowly") and c.mode == "prompt: nods slowly"
    c.apply({"prompt": ""})
    assert c.mode == "auto"
    for bad, message in [({"behaviour": "dancing"}, "unknown behaviour"), ({"prompt": "x" * 2000}, "at most"),
                         ({"prompt": "a\x07"}, "control"), ({"volume": 3}, "expected")]:
        with pytest.raises(ControlError, match=message):
            c.apply(bad)


def test_jitter_buffer_is_sized_from_measured_lateness():
    s = JitterSizer(default_s=0.16, min_samples=50)
    assert s.size() == 0.16
    for k in range(200):
        s.add(0.1 + 0.0005 * (k % 100))  # 100 .. 150 ms
    assert s.size() == pytest.approx(np.percentile([0.1 + 0.0005 * (k % 100) for k in range(200)], 99) + 0.04)
    s.recent.clear()
    for _ in range(60):
        s.add(0.001)
    assert s.size() == MIN_JITTER_BUFFER_S


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(out, format="PNG")
    return out.getvalue()


def test_uploaded_images_are_validated_with_clear_errors():
    image = decode_image(png(300, 200), "image/png", 64, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    cases = [(b"hello, I am text", "image/png", 415, "not a readable"),
             (png(100, 100), "text/plain", 415, "is not accepted"),
             (png(100, 100), "image/jpeg", 415, "PNG, not image/jpeg"),
             (png(8, 100), "image/png", 422, "too small"),
             (png(100, 100)[:60], "image/png", 415, "not a readable"),
             (b"\x89PNG" + bytes(MAX_IMAGE_BYTES), "image/png", 413, "larger than")]
    for body, ctype, status, message in cases:
        with pytest.raises(Refused, match=message) as e:
            decode_image(body, ctype, 64, 64)
        assert e.value.status == status


# --- a real server and a real edge ----------------------------------------------------------------

MAX_SESSIONS = 2


def test_edge_metrics_publish_every_metric_the_contract_names():
    page = EdgeMetrics().text().decode()
    for name, (kind, _help) in WEB_METRICS.items():
        assert metric_value(page, name + "_count" if kind == "HISTOGRAM" else name) == 0, name


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """A tiny server with a long idle TTL: a stream that leaves it within this file's waits was ended by END.
    Seeded random weights (the suite's shared ONNX export), or, when the README's screenshot is taken,
    the shipped trained tiny checkpoint (exported here: about a minute more)."""
    from flowact.networks import shipped_checkpoint
    from flowact.serving.repository import RepositoryOptions, build_embedded_repository
    from flowact.serving.server import TritonServer

    tmp = tmp_path_factory.mktemp("web")
    trained = bool(os.environ.get(SCREENSHOT_ENV))
    onnx = tmp / "onnx" if trained else request.getfixturevalue("onnx_dir")
    repo = build_embedded_repository("tiny", tmp / "repo", shipped_checkpoint("tiny") if trained else None,
                                     RepositoryOptions(capacity=8, idle_ttl_s=120.0), onnx_dir=onnx)
    http_port, grpc_port, metrics_port = free_ports(3)
    srv = TritonServer(repo, grpc_port, http_port, metrics_port, work_dir=tmp / "triton",
                       extra_env={"FLOWACT_DRAIN_FILE": str(tmp / "draining")}).start(timeout_s=120)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def edge(server, tmp_path_factory):
    (port,) = free_ports(1)
    log = open(tmp_path_factory.mktemp("edge") / "edge.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flowact.cli", "web", "--url", url(server), "--port", str(port),
                             "--max-sessions", str(MAX_SESSIONS)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/healthz", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"flowact web did not come up:\n{log.read()}")
            time.sleep(0.3)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.seek(0)
    print(log.read()[-3000:])


def active_streams(srv) -> float:
    return metric_value(metrics(srv), ACTIVE_STREAMS)


def edge_sessions(edge: str) -> int:
    return json.loads(http("GET", edge + "/v1/config")[2])["sessions"]


def http(method: str, address: str, body: bytes | None = None, ctype: str | None = None):
    """-> (status, headers, body)"""
    request = urllib.request.Request(address, data=body, method=method, headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


async def aiortc_viewer(base: str, seconds: float, delete: bool = True, audio: bool = True) -> dict:
    """A non-browser viewer (flowact.web.viewer) for `seconds`, switching behaviour half-way; then DELETE
    (twice: the second must be 404) or just close."""
    from flowact.web.viewer import Viewer

    v = await Viewer(base, str(SPEECH_WAV) if audio else None).connect()
    await asyncio.sleep(seconds / 2)
    v.control({"behaviour": "listening"})
    v.control({"behaviour": "dancing"})
    await asyncio.sleep(seconds / 2)
    seen = {"video": v.video, "audio": v.audio, "messages": v.messages, "location": v.location,
            "ctype": v.answer_type}
    if delete:
        seen["delete"] = await v.close()
        import aiohttp

        async with aiohttp.ClientSession() as client:
            async with client.delete(base + v.location) as r:
                seen["delete_again"] = r.status, await r.text()
    else:
        await v.close(delete=False)
    return seen


def test_aiortc_client_follows_the_signaling_contract(server, edge):
    before = metrics(server)
    seen = asyncio.run(aiortc_viewer(edge, seconds=6.0))
    assert seen["ctype"] == "application/sdp" and seen["location"].startswith(WEB_SESSIONS_PATH + "/")
    assert seen["delete"] == 204 and seen["delete_again"][0] == 404
    frames = seen["video"]
    assert len(frames) >= 75, f"{len(frames)} frames in 6 s"
    fps = (len(frames) - 1) / (frames[-1][0] - frames[0][0])
    assert fps >= 23, fps
    assert frames[-1][1].shape == (64, 64, 3) and frames[-1][1].std() > 5  # the preset's size, not blank
    assert len(seen["audio"]) > 100  # the speech came back (20 ms frames)
    kinds = [m["type"] for m in seen["messages"]]
    assert "session" in kinds and "stats" in kinds
    assert {"type": "behaviour", "mode": "listening"} in seen["messages"]
    assert any(m["type"] == "error" and "unknown behaviour" in m["message"] for m in seen["messages"])
    stats = [m for m in seen["messages"] if m["type"] == "stats"][-1]
    assert stats["frames_sent"] > 50 and stats["mouth_latency_p50_ms"] > 0
    # DELETE sent END: the stream left the server at once (its idle TTL is 120 s)
    wait_for(lambda: active_streams(server) == 0, 10, "the server's active streams back to 0")
    after = metrics(server)
    ended = "flowact_streams_ended_total"
    assert metric_value(after, ended) == metric_value(before, ended) + 1
    page = http("GET", edge + "/metrics")[2].decode()
    for name in (WEB_TTFF, WEB_MOUTH_LATENCY, WEB_AUDIO_DELAY):
        assert metric_value(page, name + "_count") >= 1, name
    assert metric_value(page, WEB_SESSIONS_ACTIVE) == 0


def test_a_viewer_that_just_closes_and_one_without_audio(server, edge):
    """No DELETE: the peer connection closing ends the session (END sent). No audio track: silence
    keeps the avatar alive."""
    seen = asyncio.run(aiortc_viewer(edge, seconds=4.0, delete=False, audio=False))
    assert len(seen["video"]) >= 40 and "delete" not in seen
    stats = [m for m in seen["messages"] if m["type"] == "stats"][-1]
    assert stats["mode"] == "listening"
    wait_for(lambda: active_streams(server) == 0, 15, "the server's active streams back to 0")
    wait_for(lambda: edge_sessions(edge) == 0, 10, "the edge's sessions to end")


def test_signaling_refusals_are_clear(server, edge):
    from aiortc import RTCPeerConnection

    async def offer() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    sdp = asyncio.run(offer()).encode()
    sessions = edge + WEB_SESSIONS_PATH
    status, _, body = http("POST", sessions, sdp, "text/plain")
    assert status == 415 and b"application/sdp" in body
    status, _, body = http("POST", sessions, b"v=0 not really", "application/sdp")
    assert status == 400 and b"does not receive video" in body
    status, _, body = http("POST", sessions + "?behaviour=dancing", sdp, "application/sdp")
    assert status == 400 and b"unknown behaviour" in body
    status, _, body = http("POST", sessions + "?image=deadbeef", sdp, "application/sdp")
    assert status == 404 and b"POST it to /v1/images" in body
    status, _, body = http("POST", edge + "/v1/images", b"GIF89a? no, text", "image/png")
    assert status == 415 and b"not a readable" in body
    status, headers, body = http("POST", edge + "/v1/images", REFERENCE_IMAGE.read_bytes(), "image/png")
    assert status == 201 and headers["Location"] == f"/v1/images/{json.loads(body)['id']}"
    image_id = json.loads(body)["id"]
    status, _, body = http("GET", edge + f"/v1/images/{image_id}")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (64, 64)
    # the edge admits --max-sessions (these never connect: no stream reaches the server)
    made = [http("POST", sessions + f"?image={image_id}", sdp, "application/sdp") for _ in range(MAX_SESSIONS)]
    assert [m[0] for m in made] == [201] * MAX_SESSIONS
    status, headers, body = http("POST", sessions, sdp, "application/sdp")
    assert status == 503 and headers["Retry-After"] and b"at capacity" in body and b"--max-sessions" in body
    for _, headers, _ in made:
        assert http("DELETE", edge + headers["Location"])[0] == 204
    assert edge_sessions(edge) == 0 and http("GET", sessions)[0] == 401  # no anonymous list
    assert active_streams(server) == 0


# --- headless chromium ----------------------------------------------------------------------------


def chromium(extra: list[str] = ()):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (`make test` installs them with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--mute-audio",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={SPEECH_WAV}", "--autoplay-policy=no-user-gesture-required",
                "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows", "--window-size=980,660", *extra]:
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def browser_stats(driver) -> dict:
    return driver.execute_async_script("window.flowactStats().then(arguments[arguments.length - 1])")


def test_browser_two_tabs_live_video_and_audio(server, edge, tmp_path):
    driver = chromium()
    try:
        tabs = []
        for _ in range(2):
            if tabs:
                driver.switch_to.new_window("tab")
            driver.get(edge + "/")
            driver.find_element("id", "start").click()  # microphone: chromium's fake one plays speech.wav
            tabs.append(driver.current_window_handle)
        first = {}
        for tab in tabs:
            driver.switch_to.window(tab)
            wait_for(lambda: (browser_stats(driver) or {}).get("framesDecoded"), 30, "the first decoded frames")
            first[tab] = browser_stats(driver)
        offsets = []  # audio minus video playout time (getStats estimatedPlayoutTimestamp, the edge's clock), ms
        deadline = time.monotonic() + 10.5
        while time.monotonic() < deadline:
            time.sleep(1.0)
            for tab in tabs:
                driver.switch_to.window(tab)
                s = browser_stats(driver)
                if s.get("audioPlayoutNtp") and s.get("videoPlayoutNtp"):
                    offsets.append(s["audioPlayoutNtp"] - s["videoPlayoutNtp"])
        last = {}
        for tab in tabs:
            driver.switch_to.window(tab)
            last[tab] = s = browser_stats(driver)
            assert s["error"] is None, s["error"]
            seconds = (s["at"] - first[tab]["at"]) / 1000
            fps = (s["framesDecoded"] - first[tab]["framesDecoded"]) / seconds
            print(f"tab {tab[:8]}: {fps:.2f} fps over {seconds:.1f} s, TTFF {s['ttffMs']} ms, edge {s['edge']}")
            assert seconds >= 10 and fps >= 24, f"{fps:.2f} fps over {seconds:.1f} s"
            assert (s["width"], s["height"]) == (64, 64)
            frame = driver.execute_script("return window.flowactFrame()")
            assert (frame["width"], frame["height"]) == (64, 64) and frame["std"] > 5, frame  # not blank
            assert s["audioSamples"] > 10 * 48000 * 0.8, s["audioSamples"]  # the speech came back
        if offsets:
            print(f"browser A/V offset, audio minus video playout (ms): median {np.median(offsets):.0f}, "
                  f"min {min(offsets)}, max {max(offsets)}, n {len(offsets)}")
        ids = {last[t]["sessionId"] for t in tabs}
        assert len(ids) == 2  # two sessions ...
        assert edge_sessions(edge) == 2 and active_streams(server) == 2  # ... two gRPC streams
        driver.switch_to.window(tabs[0])
        shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "web.png")
        Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB").quantize(64).save(shot, optimize=True)
        # closing a tab ends its session; the other goes on
        driver.switch_to.window(tabs[1])
        driver.close()
        wait_for(lambda: active_streams(server) == 1, 15, "one stream left after closing a tab")
        driver.switch_to.window(tabs[0])
        before = browser_stats(driver)["framesDecoded"]
        time.sleep(1.0)
        assert browser_stats(driver)["framesDecoded"] > before + 15
        driver.close()
        wait_for(lambda: active_streams(server) == 0, 15, "the server's active streams back to 0")
    finally:
        try:
            driver.quit()
        except Exception:  # closing its last tab may have ended the browser already
            pass
    wait_for(lambda: edge_sessions(edge) == 0, 10, "the edge's sessions to end")
