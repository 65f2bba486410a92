"""Video files <-> tensors, through PyAV (any container FFmpeg reads; MP4 and GIF written).

Frames are uint8 [T, H, W, 3] (RGB) on the file side; the model takes float [3, T, H, W] in
[-1, 1] (to_model / from_model convert).
"""
from __future__ import annotations

import os

import torch

from sora_model.checks import is_int, is_real


def _av():
    try:
        import av
    except ImportError as e:  # a clear error rather than a bare ImportError deep in a call
        raise ImportError("video I/O needs PyAV: pip install av (or the project's [model] extra)") from e
    return av


def read_video(path: str, *, max_frames: int | None = None, start: int = 0) -> tuple[torch.Tensor, float]:
    """(frames uint8 [T, H, W, 3], frames per second) of the first video stream of `path`,
    from frame `start`, at most max_frames of them."""
    if not is_int(start) or start < 0:
        raise ValueError(f"start: expected a frame index >= 0, got {start!r}")
    if max_frames is not None and (not is_int(max_frames) or max_frames < 1):
        raise ValueError(f"max_frames: expected a positive int or None, got {max_frames!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    av = _av()
    frames = []
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"path: {path!r} has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        for i, frame in enumerate(container.decode(stream)):
            if i < start:
                continue
            if max_frames is not None and len(frames) >= max_frames:
                break
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
    if not frames:
        raise ValueError(f"path: {path!r} has no frames from frame {start}")
    return torch.stack(frames), fps


def probe_video(path: str, *, max_frames: int | None = None) -> tuple[int, int, int]:
    """(frames, height, width) of the first video stream of `path`, without decoding: the
    frames are its packets with data, counted by demuxing (a container's own frame count is
    missing or approximate in several formats), up to max_frames (demuxing stops there). A
    stream whose packets do not each decode to one frame (edit lists, broken packets) counts
    differently from read_video."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    av = _av()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"path: {path!r} has no video stream")
        stream = container.streams.video[0]
        frames = 0
        for packet in container.demux(stream):
            if max_frames is not None and frames >= max_frames:
                break
            frames += packet.size > 0
        return frames, stream.codec_context.height, stream.codec_context.width


class VideoWriter:
    """Writes uint8 frames [t, H, W, 3] to `path` as they come, chunk by chunk (a streaming
    decode's), so the whole video is never held: .mp4 (H.264 where this FFmpeg has it, else
    MPEG-4 part 2) or .gif (a fixed 3-3-2 bit palette, for previews; frame delays are whole
    1/100 s, so 12 fps plays at 12.5). The first chunk sets H and W; the file is complete when
    the writer closes (use it as a context manager)::

        with VideoWriter("out.mp4", fps=24) as writer:
            for frames in chunks:
                writer.write(frames)
    """

    def __init__(self, path: str, *, fps: float = 24.0):
        if not is_real(fps) or not 0 < fps < float("inf"):
            raise ValueError(f"fps: expected a positive finite number, got {fps!r}")
        self.ext = os.path.splitext(path)[1].lower()
        if self.ext not in (".mp4", ".gif"):
            raise ValueError(f"path: expected a .mp4 or .gif file name, got {path!r}")
        self.path, self.fps, self.frames = path, fps, 0
        self._av, self._container, self._stream = _av(), None, None

    def write(self, frames: torch.Tensor) -> None:
        """Appends uint8 frames [t, H, W, 3] (H and W those of the first chunk)."""
        if (not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3
                or frames.dtype != torch.uint8):
            got = (tuple(frames.shape), frames.dtype) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"frames: expected uint8 [T, H, W, 3], got {got}")
        if min(frames.shape[:3]) < 1:
            raise ValueError(f"frames: expected at least one frame of at least 1 x 1 pixels, got {tuple(frames.shape)}")
        T, H, W, _ = frames.shape
        if self._stream is None:
            self._open(H, W)
        elif (H, W) != (self._stream.height, self._stream.width):
            raise ValueError(f"frames: expected {self._stream.height} x {self._stream.width} frames (the first "
                             f"chunk's), got {tuple(frames.shape)}")
        for frame in frames.cpu().numpy():
            for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.frames += T

    def _open(self, H: int, W: int) -> None:
        from fractions import Fraction
        if self.ext == ".mp4" and (H % 2 or W % 2):
            raise ValueError(f"frames: MP4 (yuv420p) needs even H and W, got H={H}, W={W}")
        rate = Fraction(self.fps).limit_denominator(1000)
        self._container = self._av.open(self.path, mode="w")
        if self.ext == ".gif":
            stream = self._container.add_stream("gif", rate=rate)
            stream.pix_fmt = "rgb8"
        else:
            codec = "libx264" if "libx264" in self._av.codecs_available else "mpeg4"
            stream = self._container.add_stream(codec, rate=rate)
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                # One encoder thread: the bytes must not depend on scheduling. PyAV's default
                # (slice threads) made 13 of 400 encodes of one clip differ on a loaded 2-core
                # machine; frame threads passed 400 alone, yet the chunked-write test failed with
                # them in two clean CI runs of the whole suite in a row (2026-12-08). Slower on
                # long 1080p samples.
                stream.codec_context.thread_type = "FRAME"
                stream.codec_context.thread_count = 1
        stream.width, stream.height = W, H
        self._stream = stream

    def close(self) -> None:
        """Flushes the encoder and closes the file (nothing is written without a frame)."""
        if self._container is None:
            return
        container, self._container = self._container, None
        try:
            if self._stream is not None:          # (None: the stream's set-up failed)
                for packet in self._stream.encode():
                    container.mux(packet)
        finally:
            container.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str, frames: torch.Tensor, *, fps: float = 24.0) -> None:
    """Writes uint8 frames [T, H, W, 3] to `path` (.mp4 or .gif: VideoWriter, in one chunk)."""
    with VideoWriter(path, fps=fps) as writer:
        writer.write(frames)


def to_model(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0
