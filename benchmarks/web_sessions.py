"""How many viewer sessions a `flowact web` edge and its server sustain in real time.

N aiortc viewers (flowact.web.viewer, each sending the shipped speech and receiving video and audio)
run at once for `--seconds`; a point is real time when every viewer received >= 24 fps and at most 1 %
of the frames the edge sent were late (repeated because their chunk was not back in time). The viewers
run on the same machine as the edge and the server and take CPU from both: the numbers are a floor.

    python -m flowact.benchmarks.web_sessions --edge http://127.0.0.1:8080 --sessions 1,2,4,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path

from flowact.media import SPEECH_WAV
from flowact.serving.health import metric_value
from flowact.stats import percentile

MIN_FPS = 24.0
MAX_LATE = 0.01


async def point(edge: str, n: int, seconds: float) -> dict:
    from flowact.web.viewer import Viewer

    viewers = [Viewer(edge, str(SPEECH_WAV), keep_frames=False) for _ in range(n)]
    load = os.getloadavg()[0]
    for v in viewers:  # staggered like real arrivals
        await v.connect()
        await asyncio.sleep(0.48 / n)
    await asyncio.sleep(seconds)
    rows = []
    for v in viewers:
        times = [t for t, _ in v.video]
        window = [t for t in times if t >= times[0] + 1.0] if times else []  # after the first second
        fps = (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 else 0.0
        stats = v.stats() or {}
        rows.append({"fps": round(fps, 2), "ttff_ms": stats.get("ttff_ms"),
                     "mouth_p50_ms": stats.get("mouth_latency_p50_ms"), "mouth_p99_ms": stats.get("mouth_latency_p99_ms"),
                     "audio_delay_ms": stats.get("audio_delay_ms"), "jitter_buffer_ms": stats.get("jitter_buffer_ms"),
                     "frames_sent": stats.get("frames_sent", 0), "frames_late": stats.get("frames_late", 0),
                     "audio_frames": len(v.audio)})
    await asyncio.gather(*(v.close() for v in viewers))
    sent = sum(r["frames_sent"] for r in rows)
    late = sum(r["frames_late"] for r in rows)
    fps = [r["fps"] for r in rows]
    result = {"sessions": n, "seconds": seconds, "loadavg_at_start": round(load, 2), "fps_min": min(fps),
              "fps_mean": round(sum(fps) / n, 2), "late_rate": round(late / max(sent, 1), 4),
              "mouth_p50_ms_median": percentile([r["mouth_p50_ms"] for r in rows if r["mouth_p50_ms"]], 50),
              "mouth_p99_ms_max": max((r["mouth_p99_ms"] or 0) for r in rows),
              "ttff_ms_median": percentile([r["ttff_ms"] for r in rows if r["ttff_ms"]], 50), "viewers": rows}
    result["realtime"] = result["fps_min"] >= MIN_FPS and result["late_rate"] <= MAX_LATE
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edge", required=True, help="the edge's base URL")
    p.add_argument("--sessions", default="1,2,4,8", help="comma-separated session counts")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--out", type=Path, default=None, help="write the points as JSON here")
    args = p.parse_args(argv)
    points = []
    for n in [int(x) for x in args.sessions.split(",")]:
        result = asyncio.run(point(args.edge, n, args.seconds))
        points.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "viewers"}), flush=True)
        time.sleep(3.0)  # let the sessions end on the server
    with urllib.request.urlopen(args.edge.rstrip("/") + "/metrics", timeout=10) as r:
        text = r.read().decode()
    ready = {"chunks": metric_value(text, "flowact_web_chunk_ready_seconds_count"),
             "mean_s": metric_value(text, "flowact_web_chunk_ready_seconds_sum")
             / max(metric_value(text, "flowact_web_chunk_ready_seconds_count") or 1, 1)}
    report = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(), "points": points,
              "chunk_ready": ready,
              "realtime_sessions": max([p["sessions"] for p in points if p["realtime"]], default=0)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"real time up to {report['realtime_sessions']} sessions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
