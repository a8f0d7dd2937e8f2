"""Drawing frames of a synthetic scene with numpy: one static background per video, shapes via masks.

A frame costs one background copy plus a small masked patch per object, which keeps rendering
well above real time on one core.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np

from lofi.synth.scene import Scene

# Implicit shapes on coordinates (u, v) in object units: inside where True. Every shape fits in
# the unit disc, so a patch of half-size radius_px holds the whole object at any angle.
SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.7,
    "bar": lambda u, v: (np.abs(u) <= 0.95) & (np.abs(v) <= 0.3),
    "triangle": lambda u, v: (v >= -0.5) & (v <= 1.0 - math.sqrt(3.0) * np.abs(u)),
    "cross": lambda u, v: ((np.abs(u) <= 0.95) & (np.abs(v) <= 0.28)) | ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.95)),
    "ellipse": lambda u, v: u * u + 4.0 * v * v <= 1.0,
}


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    # Half-way to grey, so the saturated object palette stays visible on most backgrounds.
    colour = rng.uniform(40.0, 210.0, size=3)
    return 0.5 * colour + 0.5 * colour.mean()


def make_plain_background(rng: np.random.Generator, size_px: int) -> np.ndarray:
    """Simple scenes: one muted colour (H, W, 3) uint8 with a barely visible gradient (under 9 levels either way)."""
    yy, xx = np.mgrid[0:size_px, 0:size_px] / max(size_px - 1, 1) - 0.5  # (H, W) each, in [-0.5, 0.5]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    image = _muted_colour(rng) + rng.uniform(-12.0, 12.0, size=3) * ramp[..., None]  # (H, W, C)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_background(rng: np.random.Generator, size_px: int) -> np.ndarray:
    """Cluttered scenes: a static texture (H, W, 3) uint8, a two-colour gradient plus a low-contrast pattern."""
    yy, xx = np.mgrid[0:size_px, 0:size_px] / size_px
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    low, high = _muted_colour(rng), _muted_colour(rng)
    image = low + (high - low) * ramp[..., None]  # (H, W, C)
    kind = rng.integers(4)
    if kind == 0:  # stripes
        freq, tilt = rng.uniform(2, 8), rng.uniform(0, np.pi)
        pattern = np.sin(2 * np.pi * freq * (np.cos(tilt) * xx + np.sin(tilt) * yy))
    elif kind == 1:  # checkerboard
        cells = rng.integers(3, 9)
        pattern = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) * 2.0 - 1.0
    elif kind == 2:  # soft blobs
        pattern = np.zeros_like(xx)
        for _ in range(int(rng.integers(3, 8))):
            cx, cy, width = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
            pattern += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
        pattern = pattern / max(float(pattern.max()), 1e-6) * 2.0 - 1.0
    else:  # plain gradient
        pattern = np.zeros_like(xx)
    tint = rng.uniform(-1.0, 1.0, size=3)
    image = image + rng.uniform(10.0, 30.0) * pattern[..., None] * tint
    return np.clip(image, 0, 255).astype(np.uint8)


def draw_object(
    canvas: np.ndarray, shape: str, colour: tuple[int, int, int], x_px: float, y_px: float, angle_rad: float,
    radius_px: float,
) -> None:
    """Paint one shape into `canvas` (H, W, 3) in place, wrapping around the edges."""
    size_px = canvas.shape[0]
    half = int(math.ceil(radius_px)) + 1
    left, top = int(math.floor(x_px)) - half, int(math.floor(y_px)) - half
    offsets = np.arange(2 * half + 1)
    # Pixel centres relative to the (sub-pixel) object centre, rotated into object units.
    dx = (left + offsets + 0.5 - x_px)[None, :]
    dy = (top + offsets + 0.5 - y_px)[:, None]
    cos_a, sin_a = math.cos(angle_rad), math.sin(angle_rad)
    u = (cos_a * dx + sin_a * dy) / radius_px
    v = (-sin_a * dx + cos_a * dy) / radius_px
    mask = SHAPE_MASKS[shape](u, v)
    rows = (top + offsets) % size_px
    cols = (left + offsets) % size_px
    if rows[0] < rows[-1] and cols[0] < cols[-1]:  # no wrap: a view, no copy
        canvas[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1][mask] = colour
    else:
        patch = canvas[rows[:, None], cols[None, :]]
        patch[mask] = colour
        canvas[rows[:, None], cols[None, :]] = patch


def render_frames(scene: Scene, background: np.ndarray) -> Iterator[np.ndarray]:
    """Yield the scene's frames, (H, W, 3) uint8 each; objects drawn in a fixed depth order."""
    for n in range(scene.num_frames):
        frame = background.copy()
        for i, obj in enumerate(scene.objects):
            draw_object(
                frame, obj.shape, obj.colour, float(scene.x_px[i, n]), float(scene.y_px[i, n]),
                float(scene.angle_rad[i, n]), float(scene.radius_px[i, n]),
            )
        yield frame
