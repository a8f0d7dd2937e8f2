"""BMN: Boundary-Matching Network (Lin et al., ICCV 2019), on the project's snippet grid.

Three parts, as in the paper and its official code: a 1D base module shared by a temporal
evaluation module (start/end probabilities per snippet) and a proposal evaluation module.
The latter reads every proposal through the boundary-matching (BM) layer: for each cell
[d, s] of the (D, T) duration x start map it samples `num_sample` points evenly over the
proposal extended by `prop_boundary_ratio` of its length on each side, each point the mean
of `num_sample_perbin` linearly interpolated sub-samples. All of that is one fixed
(T, N * D * T) matrix, so the layer is a single matmul; a 3D conv then collapses the N
samples and 2D convs give the IoU classification and regression maps.

Where we differ from the official code, and why:
- The proposal [s, s + d] covers snippet units [s, s + d + 1) (lofi/targets.py); snippet
  features sit at the snippet centres, so in feature-index coordinates the proposal spans
  [s - 1/2, s + d + 1/2] (the official code samples [s, s + d], half a snippet short each side).
- Sample positions outside the video are clamped to the first/last snippet instead of
  contributing zero, so every sample's weights sum to 1; with zero padding the BM features of
  all proposals near the video edges shrink, which at T = 25 is most of the map.
- The 2D/3D widths follow `hidden` (official: 256 -> 1D 256, 3D 512, 2D 128) so tests can be tiny.
- A `ClassBranch` over the base features gives per-snippet class logits (lofi/heads/common.py).
- The BM matrix is a non-persistent buffer: it is rebuilt from the constructor arguments, so
  checkpoints do not carry it (at T = D = 100 and 32 samples it is 128 MB of float32).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lofi.heads.common import ClassBranch, HeadOutput


def bm_sampling_mask(
    num_snippets: int,
    max_duration: int,
    num_sample: int = 32,
    num_sample_perbin: int = 3,
    prop_boundary_ratio: float = 0.5,
) -> np.ndarray:
    """(T, N, D, T) float32 weights: BM feature [c, n, d, s] = sum_t x[c, t] * mask[t, n, d, s].

    Zero for invalid cells (s + d >= T); for valid cells each (n, d, s) column sums to 1.
    """
    T, D, N, P = num_snippets, max_duration, num_sample, num_sample_perbin
    if N * P < 2:
        raise ValueError(f"num_sample * num_sample_perbin must be >= 2, got {N} * {P}")
    d = np.arange(D, dtype=np.float64)[:, None]
    s = np.arange(T, dtype=np.float64)[None, :]
    length = d + 1.0
    lo = s - 0.5 - prop_boundary_ratio * length  # (D, T) in feature-index coordinates
    hi = s + d + 0.5 + prop_boundary_ratio * length
    frac_pos = np.arange(N * P, dtype=np.float64) / (N * P - 1)
    pos = lo[..., None] + (hi - lo)[..., None] * frac_pos  # (D, T, N*P)
    pos = np.clip(pos, 0.0, T - 1.0)
    below = np.floor(pos)
    w_above = pos - below
    idx_below = below.astype(np.int64)
    idx_above = np.minimum(idx_below + 1, T - 1)

    # Flat index into (T, N, D, T): t * N*D*T + n * D*T + d * T + s, n = sample k // P.
    n = np.arange(N * P) // P
    column = (n[None, None, :] * (D * T) + (np.arange(D)[:, None, None] * T) + np.arange(T)[None, :, None])
    column = np.broadcast_to(column, pos.shape)
    valid = np.broadcast_to(((d + s) < T)[..., None], pos.shape)
    flat = np.concatenate([idx_below[valid] * (N * D * T) + column[valid],
                           idx_above[valid] * (N * D * T) + column[valid]])
    weight = np.concatenate([(1.0 - w_above)[valid], w_above[valid]]) / P
    mask = np.bincount(flat, weights=weight, minlength=T * N * D * T)
    return mask.reshape(T, N, D, T).astype(np.float32)


def _conv1d_block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size=3, padding=1, groups=groups), nn.ReLU(inplace=True))


class BMN(nn.Module):
    """Snippet features (B, C, T) -> HeadOutput with (B, D, T) proposal maps."""

    def __init__(
        self,
        feature_dim: int,
        num_snippets: int,
        max_duration: int,
        num_classes: int,
        hidden: int = 256,
        num_sample: int = 32,
        num_sample_perbin: int = 3,
        prop_boundary_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        if not 1 <= max_duration <= num_snippets:
            raise ValueError(f"max_duration must be in [1, num_snippets={num_snippets}], got {max_duration}")
        if hidden % 4 or hidden < 8:
            raise ValueError(f"hidden must be a multiple of 4 and >= 8 (grouped convs, hidden // 2 2D width), got {hidden}")
        self.num_snippets, self.max_duration, self.num_sample = num_snippets, max_duration, num_sample
        # The official base module uses 4 groups; an input width 4 does not divide falls back to 1.
        in_groups = 4 if feature_dim % 4 == 0 else 1
        self.base = nn.Sequential(_conv1d_block(feature_dim, hidden, in_groups), _conv1d_block(hidden, hidden, 4))
        self.start_head = nn.Sequential(_conv1d_block(hidden, hidden, 4), nn.Conv1d(hidden, 1, 1), nn.Sigmoid())
        self.end_head = nn.Sequential(_conv1d_block(hidden, hidden, 4), nn.Conv1d(hidden, 1, 1), nn.Sigmoid())
        self.proposal_1d = _conv1d_block(hidden, hidden, 1)
        width_3d, width_2d = 2 * hidden, hidden // 2
        self.proposal_3d = nn.Sequential(
            nn.Conv3d(hidden, width_3d, kernel_size=(num_sample, 1, 1), stride=(num_sample, 1, 1)),
            nn.ReLU(inplace=True),
        )
        self.proposal_2d = nn.Sequential(
            nn.Conv2d(width_3d, width_2d, kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv2d(width_2d, width_2d, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width_2d, width_2d, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width_2d, 2, kernel_size=1), nn.Sigmoid(),
        )
        self.class_branch = ClassBranch(hidden, num_classes, hidden)
        mask = bm_sampling_mask(num_snippets, max_duration, num_sample, num_sample_perbin, prop_boundary_ratio)
        self.register_buffer("sample_mask", torch.from_numpy(mask).reshape(num_snippets, -1), persistent=False)

    def boundary_matching(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, N, D, T): every proposal's N sampled feature vectors."""
        B, C, T = features.shape
        if T != self.num_snippets:
            raise ValueError(f"BMN was built for num_snippets={self.num_snippets}, got features with T={T}")
        sampled = features.reshape(B * C, T) @ self.sample_mask.to(features.dtype)  # (B*C, N*D*T)
        return sampled.reshape(B, C, self.num_sample, self.max_duration, T)  # (B, C, N, D, T)

    def forward(self, features: torch.Tensor) -> HeadOutput:
        base = self.base(features)  # (B, H, T)
        start = self.start_head(base).squeeze(1)  # (B, T)
        end = self.end_head(base).squeeze(1)
        bm = self.boundary_matching(self.proposal_1d(base))  # (B, H, N, D, T)
        maps = self.proposal_2d(self.proposal_3d(bm).squeeze(2))  # (B, 2, D, T)
        return HeadOutput(
            start=start,
            end=end,
            iou_cls=maps[:, 1],  # channel order as the official code: 0 regression, 1 classification
            iou_reg=maps[:, 0],
            class_logits=self.class_branch(base),
        )
