"""The WebRTC edge (`flowact web`): people in front, the gRPC server behind.

One WebRTC session per viewer: the viewer's audio track is cut into 0.48 s chunks and streamed into
the `flowact` ensemble over one gRPC stream; the frames come back as a 25 fps video track and the
same speech as an audio track on the same playout clock, so lips and sound match. Signaling is
plain HTTP in the WHIP/WHEP style (see the README).

    timeline.py  audio in -> chunks (silence when input is late), behaviour per chunk, jitter buffer
    tracks.py    the playout clock and the two outgoing tracks (video frames, delayed speech)
    session.py   one viewer: peer connection, gRPC stream, data channel, clean end
    app.py       aiohttp: signaling, image upload, the page, /metrics
    cli.py       `flowact web`

The edge knows nothing about the model: it speaks the serving contract (flowact.contract) only.
"""
