"""Which instants and frames a fidelity level samples (lofi.sampling): hand-worked cases + properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lofi import sampling


def test_grid_times_are_sub_bin_centres():
    # 10 s, T=2 snippets of 5 s, F=2 sub-bins of 2.5 s: centres at 1.25, 3.75 | 6.25, 8.75.
    times = sampling.grid_times_sec(10.0, 2, 2)
    np.testing.assert_allclose(times, [[1.25, 3.75], [6.25, 8.75]])


def test_grid_spacing_of_a_finer_grid_keeps_the_full_levels_frame_spacing():
    # 32 s, T=2 snippets of 16 s, F=2 frames spaced as on a grid of G=8 snippets (4 s each, frames
    # 2 s apart): each snippet's pair sits 1 s either side of its centre (8 s, 24 s).
    times = sampling.grid_times_sec(32.0, 2, 2, spacing_snippets=8)
    np.testing.assert_allclose(times, [[7.0, 9.0], [23.0, 25.0]])
    # the same pair a T=8 grid takes for its snippets 1 and 5 (centres 6 s and 22 s), shifted to the
    # coarse snippets' centres: the spacing, not the place, is the full level's
    full = sampling.grid_times_sec(32.0, 8, 2)
    np.testing.assert_allclose(np.diff(full, axis=1)[[1, 5]], np.diff(times, axis=1))
    # G equal to T is the plain grid
    np.testing.assert_allclose(sampling.grid_times_sec(10.0, 2, 2, spacing_snippets=2), sampling.grid_times_sec(10.0, 2, 2))
    with pytest.raises(ValueError, match="spacing_snippets"):
        sampling.grid_times_sec(10.0, 4, 2, spacing_snippets=2)  # frames would leave their snippet


def test_grid_single_frame_is_snippet_centre():
    np.testing.assert_allclose(sampling.grid_times_sec(9.0, 3, 1), [[1.5], [4.5], [7.5]])


def test_stride_grid_counts_and_overhang():
    # 10 s at a 4 s stride: snippets [0,4), [4,8), [8,12) -> T=3, the last one past the end.
    assert sampling.num_stride_snippets(10.0, 4.0) == 3
    np.testing.assert_allclose(sampling.stride_times_sec(10.0, 4.0, 2), [[1, 3], [5, 7], [9, 11]])
    # 30 / 0.1 is 300.00000000000006 in floats; that must not add a 301st snippet.
    assert sampling.num_stride_snippets(30.0, 0.1) == 300
    assert sampling.num_stride_snippets(0.5, 2.0) == 1


def test_frame_indices_nearest_round_half_up_and_clipped():
    # fps 4: frame i is shown at i/4 s (exact in binary). 0.1 s = frame 0.4 -> 0; 0.125 s = 0.5 -> 1
    # (half up); 0.625 s = 2.5 -> 3 (round-half-even would say 2); past the end -> last; negative -> 0.
    times = np.array([0.1, 0.125, 0.375, 0.625, 99.0, -1.0])
    np.testing.assert_array_equal(sampling.frame_indices(times, 4.0, 50), [0, 1, 2, 3, 49, 0])


def test_union_frames_positions_recover_each_level():
    a = np.array([[0, 5], [10, 15]])
    b = np.array([[5], [12]])
    unique, (pa_, pb) = sampling.union_frames([a, b])
    np.testing.assert_array_equal(unique, [0, 5, 10, 12, 15])
    np.testing.assert_array_equal(unique[pa_], a)
    np.testing.assert_array_equal(unique[pb], b)
    assert pa_.shape == (2, 2) and pb.shape == (2, 1)


@pytest.mark.parametrize("bad", [dict(duration_sec=0.0, num_snippets=4, frames_per_snippet=2),
                                 dict(duration_sec=5.0, num_snippets=0, frames_per_snippet=2),
                                 dict(duration_sec=5.0, num_snippets=4, frames_per_snippet=0)])
def test_grid_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        sampling.grid_times_sec(**bad)


@settings(max_examples=60, deadline=None)
@given(duration=st.floats(0.5, 600.0), t=st.integers(1, 128), f=st.integers(1, 16))
def test_grid_covers_video_evenly(duration, t, f):
    times = sampling.grid_times_sec(duration, t, f)
    assert times.shape == (t, f)
    assert times.min() > 0 and times.max() < duration
    d = duration / t
    # every snippet's frames lie inside its own span and are centred in it
    starts = np.arange(t)[:, None] * d
    assert np.all(times >= starts - 1e-9) and np.all(times <= starts + d + 1e-9)
    np.testing.assert_allclose(times.mean(axis=1), (np.arange(t) + 0.5) * d, rtol=1e-9, atol=1e-9)
    assert np.all(np.diff(times.ravel()) > 0)


@settings(max_examples=60, deadline=None)
@given(times=st.lists(st.floats(-5, 200), min_size=1, max_size=40), fps=st.floats(1.0, 60.0),
       num_frames=st.integers(1, 3000))
def test_frame_indices_pick_the_nearest_valid_frame(times, fps, num_frames):
    times = np.array(times)
    idx = sampling.frame_indices(times, fps, num_frames)
    assert idx.dtype == np.int64 and np.all((idx >= 0) & (idx < num_frames))
    # brute force: the frame whose time is nearest (ties may go either way), among valid frames
    all_times = np.arange(num_frames) / fps
    best = np.abs(all_times[None, :] - times[:, None]).min(axis=1)
    np.testing.assert_allclose(np.abs(all_times[idx] - times), best, atol=1e-9)
