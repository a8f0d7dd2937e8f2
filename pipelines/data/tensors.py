"""Arrow tensor columns the data path shares: the shards' stored frames handed out as uint8
tensors without copying, JPEG rows decoded, and the two tensor types feature columns come in
(Arrow's canonical fixed-shape tensor in files; Ray Data's own where a Ray Data shuffle carries
them)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa

SHAPE_KEY = b"lofi.shape"  # field metadata of the stored `frames`: the row's tensor shape as JSON


def fixed_tensor(values: np.ndarray, shape: list[int], dtype: pa.DataType) -> pa.ExtensionArray:
    """Rows of a flat buffer as a fixed-shape tensor column (no copy of contiguous values)."""
    storage = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), type=dtype), int(np.prod(shape)))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(dtype, shape), storage)


def tensor_column(array: np.ndarray) -> pa.ExtensionArray:
    """A numpy array (N, ...) as an Arrow fixed-shape tensor column (also when N is 0)."""
    array = np.ascontiguousarray(array)
    return fixed_tensor(array, list(array.shape[1:]), pa.from_numpy_dtype(array.dtype))


def binary_values(array: pa.LargeBinaryArray) -> np.ndarray:
    """The concatenated values of a binary array, without copying them."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset:array.offset + len(array) + 1]
    if len(array) == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]


def with_frames_tensor(table: pa.Table, shape: list[int] | None = None) -> pa.Table:
    """`table` with stored (fixed-size binary) `frames` as a uint8 fixed-shape tensor column, uncopied.

    `shape` defaults to the field's `lofi.shape` metadata; tables without stored frames
    (JPEG levels, frames already tensors, frames not selected) come back as they are.
    """
    if "frames" not in table.column_names or not pa.types.is_fixed_size_binary(table.schema.field("frames").type):
        return table
    field = table.schema.field("frames")
    shape = shape or json.loads(field.metadata[SHAPE_KEY])
    tensor_type = pa.fixed_shape_tensor(pa.uint8(), shape)
    chunks = []
    for chunk in table.column("frames").chunks:
        width = chunk.type.byte_width  # a view of the chunk's data buffer: fixed_tensor wraps it uncopied
        pixels = np.frombuffer(chunk.buffers()[1], np.uint8, count=len(chunk) * width, offset=chunk.offset * width)
        chunks.append(fixed_tensor(pixels, shape, pa.uint8()))
    column = pa.chunked_array(chunks, type=tensor_type)
    return table.set_column(table.schema.get_field_index("frames"), pa.field("frames", tensor_type), column)


def frames_array(table: pa.Table) -> np.ndarray:
    """Frames (N, Tc, F, S, S, 3) uint8 of a level table (stored, tensor or JPEG frames)."""
    if "frames" in table.column_names:
        return with_frames_tensor(table).column("frames").combine_chunks().to_numpy_ndarray()
    level = json.loads(table.schema.metadata[b"lofi.level"])
    rows = [decode_jpeg_row(images, level) for images in table.column("frames_jpeg").to_pylist()]
    shape = (0, level["snippets_per_row"], level["frames_per_snippet"], level["size_px"], level["size_px"], 3)
    return np.stack(rows) if rows else np.zeros(shape, dtype=np.uint8)


def decode_jpeg_row(images: list[bytes], level: dict[str, Any]) -> np.ndarray:
    """One row's JPEG images -> (Tc, F, S, S, 3) uint8."""
    from PIL import Image

    tc, f, s = level["snippets_per_row"], level["frames_per_snippet"], level["size_px"]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])  # (Tc*F, S, S, 3)
    return pixels.reshape(tc, f, s, s, 3)  # (Tc*F, S, S, 3) -> (Tc, F, S, S, 3)


def decode_jpeg_batch(batch: pa.Table, level: dict[str, Any]) -> pa.Table:
    """map_batches over a JPEG level: its `frames_jpeg` decoded into a uint8 `frames` tensor column."""
    tc, f, s = level["snippets_per_row"], level["frames_per_snippet"], level["size_px"]
    pixels = np.stack([decode_jpeg_row(images, level) for images in batch.column("frames_jpeg").to_pylist()])
    return batch.append_column("frames", fixed_tensor(pixels, [tc, f, s, s, 3], pa.uint8()))


def tensor_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A tensor column as one ndarray, whether Arrow's canonical tensor type (the shards) or Ray
    Data's own (what Ray Data's shuffle carries)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array.type, pa.FixedShapeTensorType):
        return array.to_numpy_ndarray()
    return array.to_numpy(zero_copy_only=False)


def ray_tensor_column(values: np.ndarray) -> pa.Array:
    """(N, ...) as Ray Data's tensor type, for columns that go through a Ray Data shuffle: with
    Arrow's canonical tensor type Ray Data's hash shuffle fails (pyarrow cannot build the empty
    array it starts from; measured with Ray 2.60, pyarrow 25)."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(values)
