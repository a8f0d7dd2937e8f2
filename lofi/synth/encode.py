"""H.264 encoding that gives the same bytes on every machine.

Two steps of a plain PyAV encode depend on the CPU rather than on the input:

- x264 picks SIMD versions of some routines at run time, and two of them are not bit-exact
  with its C code: the float macroblock-tree propagation (`mbtree_propagate_cost/list`, used by
  CRF's default `mbtree=1`) and the x9 intra-mode search. The rounding differs between the
  SSE, AVX2+FMA and AVX-512 versions, so the per-macroblock QPs, and with them the bitstream
  and the decoded frames, differ between machines: one seed, different videos depending on
  where `lofi synth` ran. (Threads are not the cause: the x264 header of every file already
  said `threads=1 lookahead_threads=1 sliced_threads=0`.) x264's `cpu-independent=1` switches
  to the canonical C versions: restricting x264 to SSE4.2, AVX2 or no SIMD at all then gives
  identical files, where before 8 of 12 test videos differed between AVX2 and AVX-512 (and
  12 of 12 from plain C), by up to 30 levels in a few dozen decoded frames.
- swscale's RGB -> YUV 4:2:0 conversion rounds differently in its SIMD and C paths (x86
  has SIMD everywhere, other architectures or builds may not). We convert with integer numpy
  instead, which is exact everywhere, and hand x264 frames that need no conversion.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np

# Single-threaded on purpose too: the generators are one-core jobs, and a thread count that
# followed the machine would change the bitstream (x264 slices and lookahead depend on it).
X264_PARAMS = "cpu-independent=1:threads=1:lookahead-threads=1:sliced-threads=0"
X264_PRESET = "veryfast"


def rgb_to_yuv420p(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.601 limited-range Y (H, W), U and V (H/2, W/2) of an (H, W, 3) uint8 frame, in integers.

    The standard 8-bit integer approximation (what decoders invert by default); chroma is the
    mean of each 2x2 block, rounded.
    """
    h, w = frame.shape[:2]
    r, g, b = (frame[..., c].astype(np.int32) for c in range(3))
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    # Sums over 2x2 blocks: (H/2, W/2) each; the >> 10 divides by 4 pixels and the 256 scale.
    rs, gs, bs = (c.reshape(h // 2, 2, w // 2, 2).sum(axis=(1, 3)) for c in (r, g, b))
    u = ((-38 * rs - 74 * gs + 112 * bs + 512) >> 10) + 128
    v = ((112 * rs - 94 * gs - 18 * bs + 512) >> 10) + 128
    return tuple(np.clip(p, 0, 255).astype(np.uint8) for p in (y, u, v))  # type: ignore[return-value]


def yuv_frame(frame: np.ndarray) -> av.VideoFrame:
    """An av.VideoFrame in yuv420p holding `frame` (H, W, 3) uint8 RGB, converted by `rgb_to_yuv420p`."""
    h, w = frame.shape[:2]
    out = av.VideoFrame(w, h, "yuv420p")
    for plane, data in zip(out.planes, rgb_to_yuv420p(frame)):
        # Planes are padded to an aligned line size: write the visible part of each row.
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        rows[:, :plane.width] = data
    return out


def encode_video(path: Path, frames: Iterable[np.ndarray], size_px: int, rate: Fraction, crf: int,
                 gop_frames: int) -> int:
    """Write an H.264 mp4 (yuv420p, one GOP per `gop_frames` so decord seeks cheaply); return the frame count."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width = stream.height = size_px
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = max(1, gop_frames)
        stream.codec_context.thread_count = 1
        stream.options = {"preset": X264_PRESET, "crf": str(crf), "x264-params": X264_PARAMS}
        count = 0
        for frame in frames:
            video_frame = yuv_frame(frame)
            video_frame.pts = count
            video_frame.time_base = 1 / rate
            container.mux(stream.encode(video_frame))
            count += 1
        container.mux(stream.encode(None))
    return count
