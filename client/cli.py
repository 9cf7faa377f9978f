"""`flowact stream`: stream a reference image and speech through a running server into an MP4."""

from __future__ import annotations

from tqdm import tqdm

from flowact.client.stream import AvatarStream
from flowact.contract import DEFAULT_URL, ENSEMBLE_MODEL, REF_IMAGE
from flowact.media import REFERENCE_IMAGE, SPEECH_WAV, Mp4Writer, load_audio, load_image, split_chunks
from flowact.stats import StreamSummary


def stream_file(url: str, image_path, audio_path, out, height: int, width: int, realtime: bool = False,
                prompt: str | None = None, stream_id=None, seed: int = 0) -> StreamSummary:
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

        with AvatarStream(url, stream_id) as stream:
            result = stream.run(image, chunks, seed=seed, prompt=prompt, realtime=realtime, on_chunk=on_chunk)
    return result.summary()


def server_geometry(url: str) -> tuple[int, int]:
    """(height, width) from the server's model metadata: the client needs no preset."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        meta = client.get_model_metadata(ENSEMBLE_MODEL)
    shape = next(i.shape for i in meta.inputs if i.name == REF_IMAGE)  # [-1, H, W, 3]
    return int(shape[1]), int(shape[2])


def add_parser(sub) -> None:
    p = sub.add_parser("stream", help="stream image + speech through a running flowact server into an MP4")
    p.add_argument("--url", default=DEFAULT_URL, help="gRPC HOST:PORT")
    p.add_argument("--image", default=str(REFERENCE_IMAGE))
    p.add_argument("--audio", default=str(SPEECH_WAV))
    p.add_argument("--out", default="out.mp4")
    p.add_argument("--realtime", action="store_true", help="pace requests at real time (a live talker)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--stream-id", default=None, help="sequence id (integer or string; default: 128 random bits, which nobody else can guess: "
                        "whoever knows a stream's id can feed, read and end it)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args) -> int:
    stream_id = args.stream_id
    if stream_id is not None and stream_id.isdigit():
        stream_id = int(stream_id)
    height, width = server_geometry(args.url)
    summary = stream_file(args.url, args.image, args.audio, args.out, height, width, args.realtime,
                          args.prompt, stream_id, args.seed)
    print(f"wrote {args.out}\n{summary.lines()}")
    return 0
