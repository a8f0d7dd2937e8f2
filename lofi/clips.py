"""Stage-1 clip classification helpers: label-preserving augmentation, class balance, metrics.

Clips are uint8 `(B, F, H, W, C)` (what stage 1 feeds `ClipClassifier`). Every augmentation
here keeps the label true for motion-defined classes: a temporal window keeps the frame
spacing (a speed is still the same speed), a square crop resized back keeps directions
(no flip: a mirror would turn move_left into move_right); a batch resized to a smaller side
(multi-scale training) keeps every motion too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def temporal_window(clips: torch.Tensor, frames: int, jitter: bool) -> torch.Tensor:
    """`frames` consecutive frames of each clip: at a random start (torch's RNG) with `jitter`
    (training), else the centred window (validation). `frames` 0 or >= F keeps all."""
    total = clips.shape[1]
    if frames <= 0 or frames >= total:
        return clips
    if jitter:
        start = torch.randint(0, total - frames + 1, (clips.shape[0],))
    else:
        start = torch.full((clips.shape[0],), (total - frames) // 2, dtype=torch.long)
    index = start[:, None] + torch.arange(frames)[None, :]  # (B, frames)
    return clips[torch.arange(clips.shape[0])[:, None], index.to(clips.device)]  # (B, frames, H, W, C)


def random_side(size_px: int, min_scale: float) -> int:
    """Multi-scale training: a side of round(size_px * u) px, u uniform in [min_scale, 1] (torch's RNG),
    for one whole batch (its clips must share a size). Spatially reduced fidelity levels show the
    encoder smaller frames (S-LoFi halves the side); meeting objects at those sizes in stage 1 keeps
    its features at the reduced levels close to those at full fidelity."""
    if min_scale >= 1.0:
        return size_px
    return max(2, round(size_px * (min_scale + (1.0 - min_scale) * float(torch.rand(())))))


def random_resized_crop(clips: torch.Tensor, min_scale: float, size_px: int | None = None) -> torch.Tensor:
    """Per clip, one crop of area scale * H * W (scale uniform in [min_scale, 1], torch's RNG; the
    aspect kept) at a random position, the same in all its frames, resized to `size_px` x `size_px`
    (default: back to H x W; bilinear, antialiased); uint8 in and out."""
    b, f, h, w, c = clips.shape
    out_h, out_w = (h, w) if size_px is None else (size_px, size_px)
    if min_scale >= 1.0:
        if (out_h, out_w) == (h, w):
            return clips
        return _resize(clips.reshape(b * f, h, w, c), out_h, out_w).reshape(b, f, out_h, out_w, c)
    out = torch.empty((b, f, out_h, out_w, c), dtype=clips.dtype, device=clips.device)
    scales = min_scale + (1.0 - min_scale) * torch.rand(b)
    for i in range(b):
        side_h = max(2, round(h * float(scales[i]) ** 0.5))
        side_w = max(2, round(w * float(scales[i]) ** 0.5))
        top = int(torch.randint(0, h - side_h + 1, (1,)))
        left = int(torch.randint(0, w - side_w + 1, (1,)))
        out[i] = _resize(clips[i, :, top:top + side_h, left:left + side_w], out_h, out_w)  # (F, H', W', C)
    return out


def _resize(frames: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """uint8 frames (N, h, w, C) resized to (N, out_h, out_w, C): bilinear, antialiased, rounded."""
    resized = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(out_h, out_w), mode="bilinear",
                            align_corners=False, antialias=True)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def class_weights(counts: Sequence[int]) -> list[float]:
    """Cross-entropy weights that give every class present the same total weight:
    N / (K * n_k) for the K classes with n_k > 0 (absent classes get 0)."""
    counts_arr = np.asarray(counts, dtype=np.float64)
    present = counts_arr > 0
    weights = np.zeros_like(counts_arr)
    weights[present] = counts_arr.sum() / (present.sum() * counts_arr[present])
    return weights.tolist()


def recall_counts(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct per true class, clips per true class), both (K,) float64."""
    predicted = logits.argmax(dim=1).cpu().numpy()
    truth = labels.cpu().numpy()
    support = np.bincount(truth, minlength=num_classes).astype(np.float64)
    correct = np.bincount(truth[predicted == truth], minlength=num_classes).astype(np.float64)
    return correct, support


def classification_metrics(correct: np.ndarray, support: np.ndarray, names: Sequence[str],
                           prefix: str) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes that have clips) and each class's recall."""
    present = support > 0
    if not present.any():
        return {}
    recall = np.divide(correct, support, out=np.zeros_like(correct), where=present)
    out = {f"{prefix}accuracy": float(correct.sum() / support.sum()),
           f"{prefix}balanced_accuracy": float(recall[present].mean()), f"{prefix}clips": float(support.sum())}
    out.update({f"{prefix}recall_{name}": float(recall[k]) for k, name in enumerate(names) if present[k]})
    return out
