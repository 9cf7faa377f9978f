"""The WebRTC edge against the public: each finding of the outside test (issue 19) replayed against a real
`flowact web` process in front of a real tiny tritonserver. Slots always come back, sessions belong to
their creator, real photos upload and bombs cannot, signaling and data channels are bounded, a hung or
restarted server is noticed. The numbers (memory, frame gaps, recovery times) come from
`python -m flowact.benchmarks.edge_hostile`, which drives the same attacks (flowact.benchmarks.edge_hostile)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import pytest

from conftest import url, wait_for
from flowact.benchmarks.edge_hostile import (EdgeProcess, big_jpeg, big_png, bomb_png, burst, make_offer, offer_with,
                                             raw_post)
from flowact.contract import ADMIN_KEY_HTTP_HEADER, WEB_SESSIONS_PATH
from flowact.serving.processes import free_ports
from flowact.serving.server import TritonServer
from flowact.web.app import BODY_TIMEOUT_S, MAX_SDP_MEDIA
from flowact.web.session import MAX_CHANNELS, MAX_CONTROL_BYTES

MAX_SESSIONS = 3
CONNECT_TIMEOUT_S = 3.0
UPSTREAM_TIMEOUT_S = 2.0
TOKEN = "t0ken-for-the-edge-tests-0123456789"
ADMIN = "admin-key-for-the-edge-tests-0123"


@pytest.fixture(scope="module")
def server(tmp_path_factory, onnx_dir):
    from flowact.serving.repository import RepositoryOptions, build_embedded_repository

    tmp = tmp_path_factory.mktemp("hostile")
    repo = build_embedded_repository("tiny", tmp / "repo", opts=RepositoryOptions(capacity=8, idle_ttl_s=30.0),
                                     onnx_dir=onnx_dir)
    ports = free_ports(3)
    box = {"make": lambda: TritonServer(repo, ports[1], ports[0], ports[2], work_dir=tmp / "triton",
                                        extra_env={"FLOWACT_DRAIN_FILE": str(tmp / "draining")})}
    box["server"] = box["make"]().start(timeout_s=120)
    yield box
    box["server"].stop()


@pytest.fixture(scope="module")
def edge(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge")
    (tmp / "tokens").write_text(f"# viewers\n{TOKEN}\n")
    (tmp / "admin").write_text(ADMIN)
    proc = EdgeProcess(url(server["server"]), tmp / "edge.log", "--max-sessions", str(MAX_SESSIONS),
                       "--connect-timeout", str(CONNECT_TIMEOUT_S), "--upstream-timeout", str(UPSTREAM_TIMEOUT_S),
                       "--no-failover",  # one server: a hung or lost one ends the session (tests/test_web_failover.py: two)
                       "--token-file", str(tmp / "tokens"), "--admin-key-file", str(tmp / "admin"))
    yield proc
    print(proc.stop()[-3000:])


def auth(**more) -> dict:
    return {"Authorization": f"Bearer {TOKEN}", **more}


def sessions_open(edge) -> int:
    return json.loads(edge.request("GET", "/v1/config")[2])["sessions"]


async def playing(viewer, frames: int = 10, within_s: float = 30.0) -> int:
    """Wait until a viewer has more than `frames` video frames (a loaded CI machine takes seconds to the first)."""
    t0 = time.monotonic()
    while len(viewer.video) <= frames and time.monotonic() - t0 < within_s:
        await asyncio.sleep(0.1)
    return len(viewer.video)


def post_offer(edge, sdp: str | bytes, query: str = "", headers: dict | None = None):
    body = sdp.encode() if isinstance(sdp, str) else sdp
    return edge.request("POST", WEB_SESSIONS_PATH + query, body, auth(**{"Content-Type": "application/sdp", **(headers or {})}))


# --- 1. slots come back -------------------------------------------------------------------------------


def test_hostile_offers_never_keep_a_slot(edge):
    slow = {}

    def slow_body():  # headers and 10 of 1,000 bytes, then nothing: cut by the read deadline
        t0 = time.monotonic()
        slow["status"] = raw_post(edge.port, WEB_SESSIONS_PATH, b"v=0\r\n12345", "application/sdp", auth(),
                                  declared=1000, stall=True)[0]
        slow["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=slow_body)
    thread.start()
    good = make_offer()
    for _ in range(MAX_SESSIONS + 1):  # the outside tester's four 2-byte requests, and one more
        status, _, body = post_offer(edge, b"\xff\xfe")
        assert status == 400 and b"not UTF-8" in body
    cases = [
        (good, "", {"Content-Type": "application/sdp; charset=klingon"}, 415, "UTF-8"),
        (b"v=0\r\n" + b"a" * (9 << 20), "", {}, 413, "larger than"),
        (offer_with(good, duplicate_mid=True), "", {}, 400, "SDP offer"),
        (offer_with(good, video="inactive"), "", {}, 400, "does not receive video"),
        (offer_with(good, video="sendonly"), "", {}, 400, "does not receive video"),
        (offer_with(good, extra_media=4000), "", {}, 400, f"at most {MAX_SDP_MEDIA}"),
        (good, "?behaviour=dancing", {}, 400, "unknown behaviour"),
    ]
    for sdp, query, headers, status, text in cases:
        got, _, body = post_offer(edge, sdp, query, headers)
        assert got == status and text.encode() in body, (got, body[:300])
    # a client that leaves in the middle of its body
    raw_post(edge.port, WEB_SESSIONS_PATH, good.encode()[:100], "application/sdp", auth(), declared=len(good), leave=True)
    assert sessions_open(edge) == 0
    thread.join(BODY_TIMEOUT_S + 10)
    assert slow["status"] == 408 and slow["seconds"] < BODY_TIMEOUT_S + 3, slow
    # after all that, --max-sessions valid offers are admitted; they never connect, and come back on their own
    made = [post_offer(edge, make_offer()) for _ in range(MAX_SESSIONS)]
    assert [m[0] for m in made] == [201] * MAX_SESSIONS, [m[2][:200] for m in made]
    status, headers, body = post_offer(edge, good)
    assert status == 503 and headers["Retry-After"] and b"--max-sessions" in body
    assert edge.request("GET", "/readyz")[0] == 503
    t0 = time.monotonic()
    wait_for(lambda: sessions_open(edge) == 0, CONNECT_TIMEOUT_S + 5, "unconnected sessions to be freed")
    assert time.monotonic() - t0 < CONNECT_TIMEOUT_S + 3
    assert edge.request("GET", "/readyz")[0] == 200


# --- 2. sessions belong to their creator -------------------------------------------------------------------


def test_only_the_creator_ends_a_session_and_nobody_lists_them(server, edge):
    from flowact.web.viewer import Viewer

    status, _, body = edge.request("POST", WEB_SESSIONS_PATH, make_offer().encode(), {"Content-Type": "application/sdp"})
    assert status == 401 and b"Bearer" in body
    assert edge.request("POST", "/v1/images", big_png(64), {"Content-Type": "image/png"})[0] == 401
    assert edge.request("GET", "/healthz", headers={"Host": "avatar.attacker.example"})[0] == 421
    assert edge.request("GET", "/healthz", headers={"Host": "localhost:1234"})[0] == 200

    prompt = "my private words"

    async def run() -> dict:
        v = await Viewer(edge.base, None, query=f"?prompt={prompt.replace(' ', '%20')}", token=TOKEN).connect()
        await playing(v)
        seen = {"location": v.location, "messages": list(v.messages)}
        seen["anonymous"] = edge.request("GET", WEB_SESSIONS_PATH)
        seen["admin"] = edge.request("GET", WEB_SESSIONS_PATH, headers={ADMIN_KEY_HTTP_HEADER: ADMIN})
        guess = v.location[:-4] + ("aaaa" if not v.location.endswith("aaaa") else "bbbb")
        seen["guess"] = edge.request("DELETE", guess)[0]
        seen["frames"] = len(v.video)
        seen["delete"] = await v.close()
        seen["again"] = edge.request("DELETE", v.location)[0]
        return seen

    seen = asyncio.run(run())
    secret = seen["location"].rsplit("/", 1)[1]
    assert len(secret) >= 43  # 256 bits, url-safe base64
    assert seen["anonymous"][0] == 401
    listed = json.loads(seen["admin"][2])
    assert seen["admin"][0] == 200 and len(listed) == 1 and listed[0]["mode"] == "prompt"
    text = json.dumps(listed) + json.dumps(seen["messages"])
    assert secret not in text and "web-" not in text and prompt not in json.dumps(listed)
    assert seen["guess"] == 404 and seen["frames"] > 10 and seen["delete"] == 204 and seen["again"] == 404
    log = edge.log()
    assert secret not in log and prompt not in log and "web-" not in log, log[-2000:]


# --- 3, 4. uploads: real photos work, bombs cannot ---------------------------------------------------------


def test_real_photos_upload_in_many_segments(edge):
    for body, ctype in ((big_png(400), "image/png"), (big_jpeg(1700), "image/jpeg")):
        status, reply = raw_post(edge.port, "/v1/images", body, ctype, auth(), segment=1400, pause_s=0.0005)
        assert status == 201, (ctype, len(body), reply[:300])
        assert json.loads(reply)["width"] == 64


def test_decompression_bombs_are_refused_and_memory_stays_bounded(edge):
    status, _, body = edge.request("POST", "/v1/images", bomb_png(6000, 6660), auth(**{"Content-Type": "image/png"}))
    assert status == 413 and b"decodes in full" in body
    worst = ("POST", "/v1/images", big_png(4096, noise=False), auth(**{"Content-Type": "image/png"}))  # the largest that decodes
    seen = burst(edge, [worst] * 12, "12 concurrent 4096x4096 PNG uploads", settle_s=1.0)
    assert set(seen["statuses"]) <= {201, 503} and seen["statuses"].get(201), seen
    assert seen["rss_peak_mb"] - seen["rss_idle_mb"] < 300 and seen["rss_settled_mb"] - seen["rss_idle_mb"] < 100, seen


# --- 9. data channels -----------------------------------------------------------------------------------


def test_data_channel_messages_and_channels_are_bounded(edge):
    from flowact.web.viewer import Viewer

    async def run() -> dict:
        calm = await Viewer(edge.base, None, token=TOKEN).connect()
        hostile = await Viewer(edge.base, None, token=TOKEN, channels=MAX_CHANNELS + 3).connect()
        await asyncio.sleep(1.5)
        seen = {"open": sum(c.readyState == "open" for c in hostile.channels)}
        hostile.channel.send("{" + " " * MAX_CONTROL_BYTES + "}")
        await asyncio.sleep(0.5)
        seen["errors"] = [m["message"] for m in hostile.messages if m.get("type") == "error"]
        before = len(calm.video)
        hostile.pc.sctp._remote_max_message_size = 0  # a hostile peer ignores the edge's advertised limit
        t0 = time.monotonic()
        hostile.channel.send("x" * (8 << 20))
        while sessions_open(edge) > 1 and time.monotonic() - t0 < 15:
            await asyncio.sleep(0.1)
        seen["ended_after"] = time.monotonic() - t0
        seen["sessions"] = sessions_open(edge)
        await asyncio.sleep(1.0)
        seen["calm_frames"] = len(calm.video) - before
        await hostile.close()
        await calm.close()
        return seen

    seen = asyncio.run(run())
    assert seen["open"] <= MAX_CHANNELS, seen
    assert any("control message refused" in m for m in seen["errors"]), seen["errors"]
    assert seen["sessions"] == 1 and seen["ended_after"] < 10, seen  # the hostile session ended, the calm one lives
    assert seen["calm_frames"] > 25, seen


# --- 6, 7, 10. a hung server, a restarted one, a POST while it is down ---------------------------------------


def test_a_hung_server_ends_sessions_and_a_restarted_one_serves_at_once(server, edge):
    from flowact.web.viewer import Viewer

    srv = server["server"]

    async def hang() -> dict:
        v = await Viewer(edge.base, None, token=TOKEN).connect()
        frames = await playing(v)
        os.killpg(srv.process.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            while sessions_open(edge) and time.monotonic() - t0 < 15:
                await asyncio.sleep(0.1)
            ended = time.monotonic() - t0
        finally:
            os.killpg(srv.process.pid, signal.SIGCONT)
        await asyncio.sleep(0.3)
        errors = [m["message"] for m in v.messages if m.get("type") == "error"]
        await v.close(delete=False)
        return {"frames": frames, "ended": ended, "errors": errors}

    seen = asyncio.run(hang())
    print(f"\nhung server (SIGSTOP): session ended {seen['ended']:.1f} s later (upstream timeout {UPSTREAM_TIMEOUT_S} s)")
    assert seen["frames"] > 10 and seen["ended"] < UPSTREAM_TIMEOUT_S + 2.5, seen
    assert any("did not answer chunk" in e for e in seen["errors"]), seen["errors"]

    srv.stop()
    t0 = time.monotonic()
    status, _, body = post_offer(edge, make_offer())
    assert status == 503 and b"not ready" in body and time.monotonic() - t0 < 5, body
    assert edge.request("GET", "/readyz")[0] == 503
    time.sleep(3.0)  # the edge's channels back off meanwhile
    server["server"] = srv = server["make"]().start(timeout_s=120)
    ready_at = time.monotonic()

    async def first_session() -> tuple[float, float]:
        v = await Viewer(edge.base, None, token=TOKEN).connect()
        answered = time.monotonic() - ready_at
        while not v.video and time.monotonic() - ready_at < 20:
            await asyncio.sleep(0.01)
        first_frame = time.monotonic() - ready_at
        await v.close()
        return answered, first_frame

    answered, first_frame = asyncio.run(first_session())
    print(f"server restarted: a new session answered {answered:.2f} s and its first frame {first_frame:.2f} s "
          "after the server was ready")
    assert answered < 2.0 and first_frame < 5.0
