"""`flowact stream`: stream a reference image and speech through a running server into an MP4."""

from __future__ import annotations

from tqdm import tqdm

from flowact.client.stream import AvatarStream, Failover, FailoverPolicy, StreamResult
from flowact.contract import DEFAULT_URL, ENSEMBLE_MODEL, FAILOVER_SNAPSHOT_EVERY, REF_IMAGE
from flowact.media import REFERENCE_IMAGE, SPEECH_WAV, Mp4Writer, load_audio, load_image, split_chunks
from flowact.stats import StreamSummary


def stream_media(url: str, image_path, audio_path, out, height: int, width: int, realtime: bool = False,
                 prompt: str | None = None, stream_id=None, seed: int = 0,
                 failover: FailoverPolicy | None = FailoverPolicy()) -> StreamResult:
    image = load_image(image_path, height, width)  # (H, W, 3) uint8
    speech = load_audio(audio_path)  # (S,) float32 16 kHz
    chunks, n_frames = split_chunks(speech)  # (N, 7680)
    written = 0
    with Mp4Writer(out, width, height, audio=speech) as writer, tqdm(total=len(chunks), unit="chunk", desc="stream") as bar:
        def on_chunk(frames):
            nonlocal written
            keep = min(len(frames), n_frames - written)  # the last chunk is trimmed to the audio
            writer.write(frames[:keep])
            written += keep
            bar.update(1)

        with AvatarStream(url, stream_id, failover=failover) as stream:
            return stream.run(image, chunks, seed=seed, prompt=prompt, realtime=realtime, on_chunk=on_chunk)


def stream_file(url: str, image_path, audio_path, out, height: int, width: int, realtime: bool = False,
                prompt: str | None = None, stream_id=None, seed: int = 0) -> StreamSummary:
    return stream_media(url, image_path, audio_path, out, height, width, realtime, prompt, stream_id, seed).summary()


def failover_lines(failovers: list[Failover]) -> str:
    """One line per failover: cause, where, what it cost."""
    return "\n".join(f"failover at chunk {f.at_chunk}: {f.cause}; resumed from chunk {f.resumed_from} after "
                     f"{f.attempts} START(s), {f.replayed} chunk(s) replayed, gap {f.gap_s * 1000:.0f} ms"
                     for f in failovers)


def server_geometry(url: str) -> tuple[int, int]:
    """(height, width) from the server's model metadata: the client needs no preset."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        meta = client.get_model_metadata(ENSEMBLE_MODEL)
    shape = next(i.shape for i in meta.inputs if i.name == REF_IMAGE)  # [-1, H, W, 3]
    return int(shape[1]), int(shape[2])


def add_parser(sub) -> None:
    p = sub.add_parser("stream", help="stream image + speech through a running flowact server into an MP4")
    p.add_argument("--url", default=DEFAULT_URL, help="gRPC HOST:PORT (or a gateway in front of replicas; any gRPC "
                   "target, e.g. ipv4:HOST:PORT1,HOST:PORT2, which fails over from the first to the next)")
    p.add_argument("--image", default=str(REFERENCE_IMAGE))
    p.add_argument("--audio", default=str(SPEECH_WAV))
    p.add_argument("--out", default="out.mp4")
    p.add_argument("--realtime", action="store_true", help="pace requests at real time (a live talker)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--stream-id", default=None, help="sequence id (integer or string; default: 128 random bits, which nobody else can guess: "
                        "whoever knows a stream's id can feed, read and end it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-failover", action="store_true",
                   help="fail when the server goes away (default: continue the stream on the same --url, e.g. a "
                        "gateway, from its last snapshot)")
    p.add_argument("--snapshot-every", type=int, default=FAILOVER_SNAPSHOT_EVERY, metavar="K",
                   help="with failover: ask for the stream's snapshot every K chunks (larger K: fewer bytes, longer replays; "
                        "0: none, a failover replays from chunk 0)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    stream_id = args.stream_id
    if stream_id is not None and stream_id.isdigit():
        stream_id = int(stream_id)
    if args.snapshot_every < 0:
        raise SystemExit(f"--snapshot-every: must be 0 (no snapshots: replay from chunk 0) or more, got {args.snapshot_every}")
    failover = None if args.no_failover else FailoverPolicy(snapshot_every=args.snapshot_every)
    height, width = server_geometry(args.url)
    result = stream_media(args.url, args.image, args.audio, args.out, height, width, args.realtime,
                          args.prompt, stream_id, args.seed, failover)
    print(f"wrote {args.out}\n{result.summary().lines()}")
    if result.failovers:
        print(failover_lines(result.failovers))
    return 0
