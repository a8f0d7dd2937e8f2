"""Per-video decoding inside Ray Data workers: one decode serves every fidelity level.

For each video: probe its frame size (PyAV reads only the headers), open a decord reader
that scales at decode time to the largest level's size, compute every level's frame
indices (`lofi.sampling`), decode their union once with `get_batch`, then give each level
its frames, resized down from the largest size, chunked into rows of the staging schema
(`pipelines.data.shards.STAGING_SCHEMA`).

Geometry (`resize`):
- `short_side_crop` (default): scale so the short side is S, keeping the aspect ratio,
  then take the centred S x S square;
- `squash`: scale straight to S x S.
Smaller levels are resized from the largest level's S x S frames with PIL's bilinear
filter, which widens its support when shrinking (antialiased, like
`torch.nn.functional.interpolate(antialias=True)`); decord's own scaling (ffmpeg swscale)
makes only the largest size. decord 0.6 mis-scales a few output widths (`_BAD_WIDTHS`:
it raises a size mismatch or returns 4 channels), so those decode one pixel wider and the
crop drops the extra column.

Every failure is caught per video and returned as an error row naming the stage:
`read` (fetching from a remote filesystem), `open` (not a readable video), `validate`
(shorter than its annotated duration), `decode` (frames that fail to decode).
"""

from __future__ import annotations

import io
import math
import re
import time
from typing import Any

import numpy as np
import pyarrow as pa

from lofi import sampling
from pipelines.data.shards import STAGING_SCHEMA

_BAD_WIDTHS = frozenset({2, 3, 4, 6, 8, 12, 16, 24, 48, 72})
# Frames per get_batch call: bounds decord's output buffer for long videos.
_DECODE_CHUNK = 64


class VideoError(Exception):
    """A per-video failure; `stage` says where it happened."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def decode_batch(batch: pa.Table, *, levels: list[dict[str, Any]], options: dict[str, Any]) -> pa.Table:
    """Ray Data UDF: input rows are videos (see prepare's items), output rows are staging rows."""
    rows: list[dict[str, Any]] = []
    for item in batch.to_pylist():
        rows.extend(decode_item(item, levels, options))
    return staging_table(rows)


def staging_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of `decode_item` as a STAGING_SCHEMA table; `frames` arrays become one binary column.

    The frames skip Python bytes objects (a copy each, then another into Arrow): their
    arrays are joined once into the column's data buffer, or used as it when there is one.
    """
    pieces = [row.pop("frames", None) for row in rows]
    table = pa.Table.from_pylist(rows, schema=STAGING_SCHEMA.remove(STAGING_SCHEMA.get_field_index("frames")))
    sizes = np.array([0 if p is None else p.nbytes for p in pieces], dtype=np.int64)
    arrays = [p.reshape(-1) for p in pieces if p is not None]
    data = arrays[0] if len(arrays) == 1 else np.concatenate(arrays) if arrays else np.zeros(0, np.uint8)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    present = [p is not None for p in pieces]
    valid = None if all(present) else pa.array(present).buffers()[1]  # JPEG and error rows: null
    frames = pa.Array.from_buffers(pa.large_binary(), len(rows), [valid, pa.py_buffer(offsets), pa.py_buffer(data)])
    return table.add_column(STAGING_SCHEMA.get_field_index("frames"), STAGING_SCHEMA.field("frames"), frames)


def decode_item(item: dict[str, Any], levels: list[dict[str, Any]], options: dict[str, Any]) -> list[dict[str, Any]]:
    """All staging rows of one video, or one error row; never raises for a bad video."""
    start = time.perf_counter()
    _crash_test_hook(item)
    base = {key: item[key] for key in ("video_id", "subset", "path", "duration_sec", "segment_start_sec",
                                       "segment_end_sec", "segment_label", "segment_label_id")}
    try:
        rows = _decode_levels(item, levels, options)
    except VideoError as err:
        return [{**base, "stage": err.stage, "error": str(err), "decode_sec": time.perf_counter() - start}]
    except Exception as err:  # decord and PyAV raise many types for damaged streams
        message = f"{type(err).__name__}: {_clean(str(err))}"
        return [{**base, "stage": "decode", "error": message, "decode_sec": time.perf_counter() - start}]
    rows = [{**base, **row, "decode_sec": 0.0} for row in rows]
    rows[0]["decode_sec"] = time.perf_counter() - start
    return rows


def _clean(message: str) -> str:
    """decord's C++ messages without their '[hh:mm:ss] /build/path.cc:123: ' prefixes and stack dumps."""
    lines = [re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line).strip() for line in message.strip().splitlines()]
    lines = [line for line in lines if line and not line.startswith("Stack trace")]
    return lines[0] if lines else "no message"


def open_source(path: str) -> str | io.BytesIO:
    """A local path as is; a filesystem URI (s3://, gs://, hdfs://, file://) fetched into memory."""
    if "://" not in path:
        return path
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_input_file(inner) as f:
            return io.BytesIO(f.read())
    except (OSError, pa.ArrowException) as err:
        raise VideoError("read", f"cannot read {path}: {err}") from err


def probe_size(source: str | io.BytesIO) -> tuple[int, int]:
    """(width, height) of the first video stream, from the container headers."""
    import av

    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise VideoError("open", "the file has no video stream")
            ctx = container.streams.video[0].codec_context
            width, height = int(ctx.width), int(ctx.height)
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise VideoError("open", f"not a readable video: {err}") from err
    finally:
        if isinstance(source, io.BytesIO):
            source.seek(0)
    if width < 1 or height < 1:
        raise VideoError("open", f"the video stream has no frame size ({width}x{height})")
    return width, height


def decode_geometry(width: int, height: int, size_px: int, resize: str) -> tuple[int, int, int, int]:
    """(decode_width, decode_height, crop_x, crop_y) that yield a size_px square."""
    if resize == "squash":
        dw, dh = size_px, size_px
    else:
        scale = size_px / min(width, height)
        dw, dh = max(size_px, round(width * scale)), max(size_px, round(height * scale))
    if dw in _BAD_WIDTHS:
        dw += 1
    return dw, dh, (dw - size_px) // 2, (dh - size_px) // 2


def level_times(level: dict[str, Any], duration_sec: float) -> np.ndarray:
    """Sample instants (T, F) of a level for a video."""
    if level.get("snippet_stride_sec"):
        return sampling.stride_times_sec(duration_sec, level["snippet_stride_sec"], level["frames_per_snippet"])
    return sampling.grid_times_sec(duration_sec, level["num_snippets"], level["frames_per_snippet"],
                                   level.get("spacing_snippets") or 0)


def _decode_levels(item: dict[str, Any], levels: list[dict[str, Any]], options: dict[str, Any]) -> list[dict[str, Any]]:
    import decord

    source = open_source(item["path"])
    width, height = probe_size(source)
    size_px = max(level["size_px"] for level in levels)
    dw, dh, x0, y0 = decode_geometry(width, height, size_px, options["resize"])
    try:
        reader = decord.VideoReader(source, width=dw, height=dh, num_threads=options["decode_threads"])
        num_frames, fps = len(reader), float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError, AssertionError) as err:
        raise VideoError("open", f"decord cannot open it: {_clean(str(err))}") from err
    _validate(item, num_frames, fps, options["duration_tolerance_sec"])
    indices = [sampling.frame_indices(level_times(level, item["duration_sec"]), fps, num_frames) for level in levels]
    unique, positions = sampling.union_frames(indices)
    decoded = np.empty((len(unique), size_px, size_px, 3), dtype=np.uint8)  # (U, S, S, 3)
    for lo in range(0, len(unique), _DECODE_CHUNK):
        batch = reader.get_batch(unique[lo:lo + _DECODE_CHUNK].tolist()).asnumpy()  # (n, dh, dw, C)
        if batch.shape[1:] != (dh, dw, 3):
            raise VideoError("decode", f"decord returned frames of shape {batch.shape[1:]}, asked for ({dh}, {dw}, 3)")
        decoded[lo:lo + len(batch)] = batch[:, y0:y0 + size_px, x0:x0 + size_px]
    rows = []
    for level, index, pos in zip(levels, indices, positions):
        rows += level_rows(level, level_frames(decoded, pos, level), index, fps, num_frames)
    return rows


def level_frames(decoded: np.ndarray, pos: np.ndarray, level: dict[str, Any]) -> np.ndarray:
    """A level's frames (T', F, S, S, 3), T' = T rounded up to whole rows, zero-padded at the end.

    Gathered (and resized) straight into the padded buffer that the rows are views of: one
    copy per level, none when a level takes every decoded frame once, in order.
    """
    num_snippets, per_row = pos.shape[0], level["snippets_per_row"]
    padded = math.ceil(num_snippets / per_row) * per_row
    same = padded == num_snippets and pos.size == len(decoded) and np.array_equal(pos.ravel(), np.arange(pos.size))
    if same and level["size_px"] == decoded.shape[1]:
        return decoded.reshape(*pos.shape, *decoded.shape[1:])  # (U, S, S, 3) -> (T, F, S, S, 3)
    s = level["size_px"]
    out = np.zeros((padded, pos.shape[1], s, s, 3), dtype=np.uint8)  # (T', F, S, S, 3)
    if s == decoded.shape[1]:
        np.take(decoded, pos, axis=0, out=out[:num_snippets], mode="clip")  # mode="clip": no temporary
    else:
        resize_frames(decoded[pos], s, out=out[:num_snippets])
    return out


def _validate(item: dict[str, Any], num_frames: int, fps: float, tolerance_sec: float) -> None:
    if not (fps > 0 and math.isfinite(fps)):
        raise VideoError("validate", f"the video reports frame rate {fps}; re-encode it with a constant frame rate")
    video_sec = num_frames / fps
    if video_sec + tolerance_sec < item["duration_sec"]:
        raise VideoError("validate", f"the video is {video_sec:.2f} s long ({num_frames} frames at {fps:g} fps) but "
                                     f"its annotation says duration {item['duration_sec']:g} s; fix the annotated "
                                     "duration or replace the file "
                                     f"(tolerance: duration_tolerance_sec={tolerance_sec:g})")


def resize_frames(frames: np.ndarray, size_px: int, out: np.ndarray | None = None) -> np.ndarray:
    """(..., S0, S0, 3) uint8 -> (..., size_px, size_px, 3) with PIL's antialiased bilinear filter.

    `out`, a C-contiguous array of the result's shape, receives the frames (no temporary).
    """
    if frames.shape[-2] == size_px and out is None:
        return frames
    from PIL import Image

    flat = frames.reshape(-1, *frames.shape[-3:])  # (..., S0, S0, 3) -> (N, S0, S0, 3)
    if out is None:
        out = np.empty((*frames.shape[:-3], size_px, size_px, 3), dtype=np.uint8)
    dst = out.reshape(len(flat), size_px, size_px, 3)  # a view: out is contiguous
    for i, frame in enumerate(flat):
        dst[i] = np.asarray(Image.fromarray(frame).resize((size_px, size_px), Image.BILINEAR))
    return out


def encode_jpeg(frames: np.ndarray, quality: int) -> list[bytes]:
    from PIL import Image

    out = []
    for frame in frames.reshape(-1, *frames.shape[-3:]):  # (T, F, S, S, 3) -> (T*F, S, S, 3)
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def level_rows(level: dict[str, Any], frames: np.ndarray, index: np.ndarray, fps: float,
               num_frames: int) -> list[dict[str, Any]]:
    """Split a level's frames into rows of snippets_per_row snippets.

    `frames` (T', F, S, S, 3) holds whole rows, zero-padded past the video's T = len(index)
    snippets (`level_frames`); uint8 rows keep views of it (staging_table joins them).
    """
    num_snippets, per_row = index.shape[0], level["snippets_per_row"]
    num_chunks = math.ceil(num_snippets / per_row)
    rows = []
    for chunk in range(num_chunks):
        lo = chunk * per_row
        valid = min(per_row, num_snippets - lo)
        pad = per_row - valid  # only the last chunk of a fixed-stride level
        idx = np.concatenate([index[lo:lo + valid], np.full((pad, index.shape[1]), -1, dtype=np.int64)])
        times = np.where(idx >= 0, idx / fps, np.nan)
        part = frames[lo:lo + per_row]  # (Tc, F, S, S, 3)
        row = {"fidelity": level["name"], "fps": fps, "num_frames": num_frames, "num_snippets": num_snippets,
               "chunk_index": chunk, "num_chunks": num_chunks, "snippet_start": lo, "num_valid_snippets": valid,
               "timestamps_sec": times.ravel().tolist(), "frame_indices": idx.ravel().tolist()}
        if level["storage"] == "jpeg":
            row["frames_jpeg"] = encode_jpeg(part, level["jpeg_quality"])
        else:
            row["frames"] = part
        rows.append(row)
    return rows


def _crash_test_hook(item: dict[str, Any]) -> None:
    """Test hook: kill this process by SIGSEGV, as a decoder crash would, when `lofi prepare` marked
    the item (`crash_test`, set from LOFI_TEST_CRASH_VIDEO=<video_id> in the driver's environment):
    no real file is known to crash decord."""
    if item.get("crash_test"):
        import signal

        signal.raise_signal(signal.SIGSEGV)
