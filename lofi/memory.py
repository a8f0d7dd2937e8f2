"""Activation memory of a training step, measured exactly, and what fits a device.

Four device-independent figures per step (`StepMemory`, all in bytes):

- ``saved_bytes``: the tensors autograd saves for backward during the forward
  (`torch.autograd.graph.saved_tensors_hooks`). Each storage counts once however many views
  of it are saved, and parameters (and their views, e.g. ``weight.t()``) are left out: they
  exist whatever the fidelity, and counting them would skew the ratios between levels.
- ``activation_bytes``: the saved tensors that the step allocated itself, alive when the
  forward ends (``saved_bytes`` less saved tensors that outlive the step: inputs made before
  it, buffers, cached index tensors).
- ``activation_peak_bytes``: the peak over forward *and* backward of the live activations:
  the saved tensors until backward frees them, plus what activation checkpointing recomputes
  during backward (its recomputed stages save their tensors inside checkpoint's own hooks,
  which an outer ``saved_tensors_hooks`` cannot see, so the ops' outputs are followed instead).
  Without checkpointing it equals ``activation_bytes``.
- ``peak_bytes``: the peak of all live tensors the step allocates (activations, gradients,
  temporaries): the CPU/meta analogue of CUDA's ``max_memory_allocated``, and the figure that
  decides whether a step fits. On CUDA, ``device_peak_bytes`` adds the allocator's own figure.

The figures come from the tensors' sizes only, so a step on the meta device (no data, no
compute) measures the same bytes as on the CPU; meta runs the encoders, but not autocast or
sparse ops (G-TAD), which run on the CPU.

Scaling argument (used by the planner, `lofi.memory_plan`, which measures small and scales;
tests/lofi/test_memory.py checks the scaled figures against direct measurements). The
encoder applies every op per frame except the temporal shift, which mixes frames only
within a snippet; so every tensor of its step has a size affine in the number of snippets T
(constants: BatchNorm's per-channel statistics, parameter gradients), the same ops run and
free in the same order whatever T, and each moment of the step (the live bytes after each op,
kept as `live_trace` / `activation_trace`) is affine in T. Two probes therefore give every
moment at any T exactly, and the peak is the highest of them; extrapolating the two peaks
alone would not be exact, since the moment of the peak can change with T (e.g. when a constant
such as autocast's half-precision weight copies dominates at small T). Spatial size is *not*
extrapolated (strides round odd sizes, so S^2 scaling is only approximate): every probe runs
at the level's own F and S. B videos are B * T snippets to the encoder. The head sees only
(B, D, T) features, so it is measured directly at the level's T, for two and three videos, and
extrapolated in B the same way.

Reference figures: a plain ResNet-18 (fp32) saves 21.15 MiB per 224 px frame and 5.36 MiB per
112 px frame. On an H200 the planner's activation figures for TSM-ResNet18 + G-TAD at the four
paper levels (fp32/fp16, with and without checkpointing) equalled those of direct full-size
steps to the byte; its all-tensor peak was 0.5-7% above the direct one (an upper bound), and
CUDA's max_memory_allocated up to 4% above the tensor peak (cuDNN workspaces, allocator).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MIB = 1024**2
GIB = 1024**3


def _storage(t: Tensor) -> torch.UntypedStorage | None:
    """The storage of a strided tensor (None for sparse and other storage-less layouts)."""
    if not isinstance(t, Tensor) or t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def storage_keys(tensors: Iterable[Tensor]) -> set[int]:
    """Identity keys of the storages under `tensors`; views share their base's key."""
    return {s._cdata for s in map(_storage, tensors) if s is not None}


class SavedTensorRecorder:
    """Context manager counting the bytes autograd saves for backward, each storage once.

    `saved_bytes` totals every storage saved while it was active; `live_bytes` follows them
    until they are freed (during backward), and `activation_live_bytes` those of them that
    `is_activation(storage key)` accepts. keep=True passes tensors through (backward works as
    usual); keep=False stores only a placeholder, so nothing is kept alive and a forward that
    would not fit in memory can be measured; backward is then impossible.
    """

    def __init__(
        self, exclude: Iterable[Tensor] = (), keep: bool = True, is_activation: Callable[[int], bool] | None = None
    ) -> None:
        self.excluded = storage_keys(exclude)
        self.keep = keep
        self.is_activation = is_activation or (lambda key: True)
        self.saved_bytes = 0
        self.live_bytes = 0
        self.activation_live_bytes = 0
        self.num_storages = 0
        self._live: dict[int, int] = {}  # storages counted and still alive
        self._activations: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _free(self, key: int) -> None:
        # a freed storage's key may be reused by a new storage, which must count again
        self.live_bytes -= self._live.pop(key, 0)
        self.activation_live_bytes -= self._activations.pop(key, 0)

    def _pack(self, t: Tensor) -> Any:
        st = _storage(t)
        if st is not None and st._cdata not in self.excluded and st._cdata not in self._live:
            self._live[st._cdata] = st.nbytes()
            weakref.finalize(st, self._free, st._cdata)
            self.saved_bytes += st.nbytes()
            self.live_bytes += st.nbytes()
            self.num_storages += 1
            if self.is_activation(st._cdata):
                self._activations[st._cdata] = st.nbytes()
                self.activation_live_bytes += st.nbytes()
        return t if self.keep else None

    def _unpack(self, packed: Any) -> Tensor:
        if packed is None:
            raise RuntimeError("SavedTensorRecorder(keep=False) measured this forward only; it cannot backward")
        return packed

    def __enter__(self) -> SavedTensorRecorder:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


class StepMemoryMeter(TorchDispatchMode):
    """Live and peak bytes of one training step, forward and backward.

    Every op run under the meter reports its outputs; a storage counts from the op that first
    returns it until it is freed. Outputs that alias an op's input (views, in-place ops) add
    nothing, so tensors made before the meter started (parameters, inputs) never count.

    Activations: the tensors `saved` (a SavedTensorRecorder, active during the forward) that
    the step itself allocated (not inputs, buffers or cached index tensors made before it),
    plus those that forward ops re-run during backward allocate: activation checkpointing's
    recomputation, told apart from gradient ops by grad mode, which autograd turns off for
    backward functions and checkpoint turns back on for the recompute.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.saved = SavedTensorRecorder(exclude, is_activation=lambda key: key in self._live)
        self.in_backward = False
        self.activation_bytes = 0
        self._live: dict[int, int] = {}
        self._recomputed: dict[int, int] = {}
        self._live_bytes = 0
        self._recomputed_bytes = 0
        # live and activation bytes right after each op: the step's moments, in order
        self.live_trace: list[int] = []
        self.activation_trace: list[int] = []

    def _record(self) -> None:
        self.live_trace.append(self._live_bytes)
        self.activation_trace.append(self.saved.activation_live_bytes + self._recomputed_bytes)

    def _free(self, key: int) -> None:
        self._live_bytes -= self._live.pop(key, 0)
        self._recomputed_bytes -= self._recomputed.pop(key, 0)

    def end_forward(self) -> None:
        """Call between forward and backward: the forward's saved tensors are all alive now."""
        self.activation_bytes = self.saved.activation_live_bytes
        self._record()
        self.in_backward = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch API)
        out = func(*args, **(kwargs or {}))
        inputs = storage_keys(x for x in tree_leaves((args, kwargs)) if isinstance(x, Tensor))
        recompute = self.in_backward and torch.is_grad_enabled()
        for t in tree_leaves(out):
            st = _storage(t) if isinstance(t, Tensor) else None
            if st is None or st._cdata in inputs or st._cdata in self._live:
                continue
            self._live[st._cdata] = st.nbytes()
            self._live_bytes += st.nbytes()
            if recompute:
                self._recomputed[st._cdata] = st.nbytes()
                self._recomputed_bytes += st.nbytes()
            weakref.finalize(st, self._free, st._cdata)
        self._record()
        return out


@dataclass(frozen=True)
class StepMemory:
    """Memory of one training step (see the module docstring); bytes."""

    saved_bytes: int
    activation_bytes: int
    activation_peak_bytes: int
    peak_bytes: int
    device_peak_bytes: int | None = None
    step_sec: float | None = None
    # live and activation bytes after each op: the planner extrapolates every moment
    live_trace: np.ndarray | None = field(default=None, compare=False, repr=False)
    activation_trace: np.ndarray | None = field(default=None, compare=False, repr=False)


def measure_step(
    step: Callable[[], Tensor], exclude: Iterable[Tensor] = (), device: str | torch.device = "cpu"
) -> StepMemory:
    """Run `step()` (forward, returns the loss) and its backward, measuring every figure.

    Tensors `step` creates (inputs included) count; `exclude` (parameters) never does.
    """
    device = torch.device(device)
    exclude = list(exclude)
    for t in exclude:
        # as after zero_grad(set_to_none=True): the step allocates its gradients, every time
        t.grad = None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    meter = StepMemoryMeter(exclude)
    with meter:
        with meter.saved:
            loss = step()
        grad = torch.ones_like(loss)  # made here so that it does not count as recomputation
        meter.end_forward()
        loss.backward(grad)
        del loss, grad
    if cuda:
        torch.cuda.synchronize(device)
    step_sec = time.perf_counter() - started
    device_peak = torch.cuda.max_memory_allocated(device) - start_bytes if cuda else None
    live, activation = (np.asarray(t, dtype=np.int64) for t in (meter.live_trace, meter.activation_trace))
    return StepMemory(
        saved_bytes=meter.saved.saved_bytes,
        activation_bytes=meter.activation_bytes,
        activation_peak_bytes=int(activation.max(initial=0)),
        peak_bytes=int(live.max(initial=0)),
        device_peak_bytes=device_peak,
        step_sec=step_sec,
        live_trace=live,
        activation_trace=activation,
    )


def _module_tensors(*modules: nn.Module) -> list[Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def measure_encoder(
    encoder: nn.Module, num_snippets: int, frames_per_snippet: int, size_px: int,
    batch_size: int = 1, device: str | torch.device = "cpu",
) -> StepMemory:
    """One step of `encoder` alone on random uint8 frames (B, T, F, H, W, 3), as shards
    store them (the float copy the encoder makes counts); the loss is the features' sum."""
    encoder.train()

    def step() -> Tensor:
        shape = (batch_size, num_snippets, frames_per_snippet, size_px, size_px, 3)
        frames = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
        return encoder(frames).float().sum()

    return measure_step(step, _module_tensors(encoder), device)


def synthetic_targets(batch_size: int, num_snippets: int, max_duration: int, num_classes: int, **kwargs: Any):
    """Targets for one action in the middle of each video (memory does not depend on them)."""
    from lofi.targets import make_targets

    video = (np.array([[25.0, 60.0]]), np.array([0]), 100.0)
    return make_targets([video] * batch_size, num_snippets, max_duration, num_classes, **kwargs)


def measure_head(
    head: nn.Module, feature_dim: int, num_snippets: int, targets: Any, loss_fn: Callable[..., dict],
    batch_size: int = 1, device: str | torch.device = "cpu",
) -> StepMemory:
    """One step of the head and its loss on random features (B, D, T) that require grad, as
    the encoder's output does (their gradient is part of the step). The step copies
    `targets` (a dataclass of tensors) in, as a training step gets its batch: they count and
    are freed with the step."""
    head.train()

    def step() -> Tensor:
        batch = type(targets)(**{f.name: getattr(targets, f.name).to(device, copy=True) for f in fields(targets)})
        features = torch.randn(batch_size, feature_dim, num_snippets, device=device, requires_grad=True)
        return loss_fn(head(features), batch)["total"]

    return measure_step(step, _module_tensors(head), device)


def static_bytes(modules: Iterable[nn.Module], optimizer_states: int = 2) -> int:
    """Parameters, buffers and optimizer state (Adam: 2 per parameter); gradients are measured."""
    total = 0
    for m in modules:
        total += sum(p.numel() * p.element_size() * (1 + optimizer_states) for p in m.parameters() if p.requires_grad)
        total += sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)
        total += sum(b.numel() * b.element_size() for b in m.buffers())
    return total


def mib(num_bytes: float) -> float:
    return num_bytes / MIB
