"""Temporal shift (TSM, Lin et al. 2019) in plain PyTorch.

The shift moves a fraction of the channels one step along time so a 2D ResNet mixes
neighbouring frames at zero extra FLOPs or parameters. As in TSM's official 'blockres'
placement the shift is applied to the input of the residual branch only (the identity path
stays unshifted), with fold = C // shift_div channels moved each way: channels
[0, fold) take the value of the NEXT frame, channels [fold, 2 * fold) the value of the
PREVIOUS frame, the rest stay. Frames that would come from outside the clip are zeros.

In LoFi the time axis of the shift is the F frames of one snippet (TSM's n_segment = F):
snippets never exchange information through the shift, so a snippet's feature depends only
on its own frames (in eval mode).
"""

from __future__ import annotations

import torch
from torch import Tensor


def temporal_shift(x: Tensor, num_frames: int, shift_div: int = 8) -> Tensor:
    """Shift 1/shift_div of the channels forward and 1/shift_div backward in time.

    x: `(N * F, C, H, W)`, the F frames of each of N clips adjacent (clip-major), as the
    ResNet sees a batch of snippets. Returns a new tensor of the same shape; x is unchanged.
    shift_div <= 0 or fewer than shift_div channels returns x itself (no shift).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    nf, c, h, w = x.shape
    if nf % num_frames:
        raise ValueError(f"batch of {nf} frames is not a whole number of clips of {num_frames} frames")
    fold = c // shift_div if shift_div > 0 else 0
    if fold == 0:
        return x
    x5 = x.reshape(nf // num_frames, num_frames, c, h, w)  # (N*F, C, H, W) -> (N, F, C, H, W)
    # A fresh zero tensor gives the zero padding at the clip ends for free; slice copies
    # save nothing for backward, so the shift adds no activation memory beyond its output.
    out = torch.zeros_like(x5)
    out[:, :-1, :fold] = x5[:, 1:, :fold]  # frame f sees frame f + 1
    out[:, 1:, fold : 2 * fold] = x5[:, :-1, fold : 2 * fold]  # frame f sees frame f - 1
    out[:, :, 2 * fold :] = x5[:, :, 2 * fold :]
    return out.reshape(nf, c, h, w)  # (N, F, C, H, W) -> (N*F, C, H, W)
