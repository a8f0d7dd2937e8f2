"""Which instants and which frames a fidelity level samples from a video (pure numpy).

Two snippet grids, both following the convention of `lofi.fidelity`:

- fixed length (the paper's): `num_snippets` T equal snippets cover the whole video, so
  snippet t spans [t * d, (t + 1) * d) with d = duration_sec / T;
- fixed stride (for feature extraction): snippets of `stride_sec` seconds from time 0,
  T = ceil(duration_sec / stride_sec), the last one possibly running past the end.

Inside a snippet, its F frames sit at the centres of F equal sub-bins: frame f of snippet
t is at time (t + (f + 0.5) / F) * d. A grid level may instead keep the frame spacing of a
finer grid of G >= T snippets (`spacing_snippets` G, e.g. the full level's T at T-LoFi): its
F frames are then duration / (G * F) apart, centred on the snippet's centre, so a level with
fewer snippets takes fewer, not sparser, frames and every snippet shows motion at the speed
the full level shows it. Times become frame indices through the source frame
rate: frame i is shown at i / fps, the index is the nearest frame (round half up), clipped
to [0, num_frames - 1] so that instants past the last decodable frame repeat it. This
assumes a constant frame rate, which is what `fps` in the annotations and in decord's
average frame rate describe.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Absorbs float error in duration / stride (30 / 0.1 = 300.00000000000006 must give 300).
_STRIDE_EPS = 1e-9


def grid_times_sec(duration_sec: float, num_snippets: int, frames_per_snippet: int,
                   spacing_snippets: int = 0) -> np.ndarray:
    """Sample instants (T, F) of the fixed-length grid: T snippets covering the video evenly, each
    snippet's frames spaced as on a grid of `spacing_snippets` (0: T, frames fill the snippet)."""
    if duration_sec <= 0:
        raise ValueError(f"duration_sec must be > 0, got {duration_sec}")
    if num_snippets < 1 or frames_per_snippet < 1:
        raise ValueError(f"num_snippets and frames_per_snippet must be >= 1, got {num_snippets}, {frames_per_snippet}")
    if spacing_snippets and spacing_snippets < num_snippets:
        raise ValueError(f"spacing_snippets must be 0 or >= num_snippets ({num_snippets}), got {spacing_snippets}")
    snippet_sec = duration_sec / num_snippets
    times = _centred_times(num_snippets, frames_per_snippet, snippet_sec)
    if not spacing_snippets or spacing_snippets == num_snippets:
        return times
    centres = (np.arange(num_snippets, dtype=np.float64)[:, None] + 0.5) * snippet_sec  # (T, 1)
    offsets = np.arange(frames_per_snippet, dtype=np.float64)[None, :] - (frames_per_snippet - 1) / 2  # (1, F)
    return centres + offsets * duration_sec / (spacing_snippets * frames_per_snippet)  # (T, F)


def num_stride_snippets(duration_sec: float, stride_sec: float) -> int:
    """T of the fixed-stride grid: enough snippets of `stride_sec` to reach the end."""
    if duration_sec <= 0 or stride_sec <= 0:
        raise ValueError(f"duration_sec and stride_sec must be > 0, got {duration_sec}, {stride_sec}")
    return max(1, math.ceil(duration_sec / stride_sec - _STRIDE_EPS))


def stride_times_sec(duration_sec: float, stride_sec: float, frames_per_snippet: int) -> np.ndarray:
    """Sample instants (T, F) of the fixed-stride grid, T = ceil(duration_sec / stride_sec)."""
    if frames_per_snippet < 1:
        raise ValueError(f"frames_per_snippet must be >= 1, got {frames_per_snippet}")
    num_snippets = num_stride_snippets(duration_sec, stride_sec)
    return _centred_times(num_snippets, frames_per_snippet, stride_sec)


def _centred_times(num_snippets: int, frames_per_snippet: int, snippet_sec: float) -> np.ndarray:
    t = np.arange(num_snippets, dtype=np.float64)[:, None]  # (T, 1)
    f = np.arange(frames_per_snippet, dtype=np.float64)[None, :]  # (1, F)
    return (t + (f + 0.5) / frames_per_snippet) * snippet_sec  # (T, F)


def frame_indices(times_sec: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
    """Nearest frame index (int64, same shape) of each instant, clipped to the decodable frames."""
    if fps <= 0 or num_frames < 1:
        raise ValueError(f"fps must be > 0 and num_frames >= 1, got {fps}, {num_frames}")
    # floor(x + 0.5) rounds half up; np.rint would round half to even and make the
    # choice between two equally near frames depend on the frame's parity.
    index = np.floor(np.asarray(times_sec, dtype=np.float64) * fps + 0.5).astype(np.int64)
    return np.clip(index, 0, num_frames - 1)


def union_frames(index_arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Frames to decode once for several levels, and where each level finds its frames.

    Returns the sorted unique indices U and, per input array A, an array P of A's shape
    with U[P] == A, so a level's frames are `decoded[P]` after decoding U in order.
    """
    if not index_arrays:
        return np.zeros(0, dtype=np.int64), []
    flat = np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in index_arrays])
    unique, inverse = np.unique(flat, return_inverse=True)
    positions, start = [], 0
    for a in index_arrays:
        size = np.asarray(a).size
        positions.append(inverse[start:start + size].reshape(np.shape(a)))
        start += size
    return unique, positions
