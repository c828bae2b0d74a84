"""Tiny videos made in the test with PyAV: each frame's colour names its index, so a test can tell
which frames were sampled. Also the broken and hostile files the video tests refuse."""

from __future__ import annotations

import base64
import io

import numpy as np

STEP = 6  # frame i is grey (i * STEP) % 256: lossless encodes keep it exactly


def make_video(
    num_frames: int = 40,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    fmt: str = "mp4",
    codec: str = "libx264",
    gop: int = 12,
    lossless: bool = True,
) -> bytes:
    import av

    width, height = size
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264" and lossless:
            stream.options = {"qp": "0", "preset": "ultrafast"}
        elif lossless:
            stream.codec_context.bit_rate = 20_000_000
        for i in range(num_frames):
            grey = np.full((height, width, 3), (i * STEP) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(grey, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def make_audio_only(seconds: float = 0.5) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        tone = (np.sin(np.arange(samples) / 5) * 0.3).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def frame_grey(image) -> int:
    """The grey level at a frame's centre."""
    array = np.asarray(image)
    return int(array[array.shape[0] // 2, array.shape[1] // 2, 0])


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
