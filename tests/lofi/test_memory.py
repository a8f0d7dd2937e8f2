"""Activation-memory measurement: hand-computable cases, scaling, checkpointing, the planner."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from lofi.heads import HeadConfig, build_head
from lofi.heads.common import tal_loss
from lofi.memory import SavedTensorRecorder, measure_encoder, measure_head, measure_step, synthetic_targets
from lofi.memory_plan import LevelMemory, extrapolate
from lofi.models.encoders import EncoderConfig, build_encoder
from lofi.targets import TALTargets

ALL_STAGES = ("layer1", "layer2", "layer3", "layer4")


def test_linear_relu_saves_input_and_output_but_not_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x = torch.randn(2, 4, requires_grad=True)
    # addmm saves its input x (2*4 floats = 32 B) and weight.t() (a view of the 3x4 weight,
    # 48 B); relu saves its output (2*3 floats = 24 B)
    with SavedTensorRecorder(exclude=model.parameters()) as rec:
        model(x)
    assert rec.saved_bytes == 32 + 24
    with SavedTensorRecorder() as everything:
        model(x)
    assert everything.saved_bytes == 32 + 24 + 48
    # in a step, x (made before it) is saved but is no activation: only relu's output is
    mem = measure_step(lambda: model(x).sum(), exclude=model.parameters())
    assert (mem.saved_bytes, mem.activation_bytes, mem.activation_peak_bytes) == (56, 24, 24)


def test_a_tensor_saved_twice_counts_once():
    x = torch.randn(3, requires_grad=True)
    with SavedTensorRecorder() as rec:
        x * x  # mul saves both operands: the same 12-byte storage
    assert rec.saved_bytes == 12 and rec.num_storages == 1
    with SavedTensorRecorder() as rec:
        x[:2] * x[1:]  # two views of one storage
    assert rec.saved_bytes == 12


def test_step_peak_hand_case():
    x = torch.randn(1000, requires_grad=True)
    mem = measure_step(lambda: x.exp().exp().sum())
    # forward: y = exp(x) (4000 B) and z = exp(y) (4000 B) are saved, the loss is 4 B.
    # backward: the seed gradient (4 B), then grad_y = grad * z (4000 B) while y and z are
    # still alive: 4000 + 4000 + 4 + 4 + 4000; z is freed before grad_x (4000 B) is made.
    assert mem.saved_bytes == mem.activation_bytes == mem.activation_peak_bytes == 8000
    assert mem.peak_bytes == 12008


def test_forward_only_recorder_keeps_nothing():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x = torch.randn(2, 4, requires_grad=True)
    with SavedTensorRecorder(model.parameters(), keep=False) as rec:
        out = model(x).sum()
    assert rec.saved_bytes == 56
    with pytest.raises(RuntimeError, match="cannot backward"):
        out.backward()


def _encoder(width: int = 8, ckpt: tuple[str, ...] = (), device: str = "meta") -> nn.Module:
    return build_encoder(EncoderConfig(width=width, activation_checkpointing=ckpt)).to(device)


@pytest.mark.parametrize("ckpt", [(), ALL_STAGES, ("layer2",)])
def test_encoder_memory_extrapolates_exactly_in_snippets(ckpt):
    enc = _encoder(ckpt=ckpt)
    m = {t: measure_encoder(enc, t, 2, 32, device="meta") for t in (2, 3, 6, 13)}
    # every moment of the step is affine in T, so two probes give the peaks too
    for T in (6, 13):
        for figure in ("saved", "activation", "activation_peak", "peak"):
            assert extrapolate(((2, m[2]), (3, m[3])), figure, T) == getattr(m[T], f"{figure}_bytes"), (T, figure)


def test_encoder_memory_scales_with_frame_area():
    enc = _encoder()
    saved = {s: measure_encoder(enc, 2, 2, s, device="meta").saved_bytes for s in (32, 64, 128)}
    # 4x the pixels -> 4x the activations, less the per-channel BatchNorm statistics
    assert 3.9 < saved[64] / saved[32] <= 4.0
    assert 3.9 < saved[128] / saved[64] <= 4.0


def test_meta_measures_the_same_bytes_as_cpu():
    for ckpt in ((), ALL_STAGES):
        cpu = measure_encoder(_encoder(ckpt=ckpt, device="cpu"), 2, 2, 32, device="cpu")
        meta = measure_encoder(_encoder(ckpt=ckpt), 2, 2, 32, device="meta")
        assert cpu.saved_bytes > 0
        assert dataclasses.replace(cpu, step_sec=None) == dataclasses.replace(meta, step_sec=None)


def test_checkpointing_reduces_activations_and_its_recompute_is_counted():
    plain = measure_encoder(_encoder(width=16), 2, 4, 64, device="meta")
    ckpt = measure_encoder(_encoder(width=16, ckpt=ALL_STAGES), 2, 4, 64, device="meta")
    assert plain.activation_peak_bytes == plain.activation_bytes == plain.saved_bytes
    assert ckpt.saved_bytes < 0.6 * plain.saved_bytes
    # recomputed stages live during backward: more than the forward saved, less than no ckpt
    assert ckpt.saved_bytes < ckpt.activation_peak_bytes < plain.activation_peak_bytes
    assert ckpt.peak_bytes < plain.peak_bytes


def _head_and_loss(feature_dim: int, num_snippets: int):
    cfg = HeadConfig(name="gtad", hidden=16, cardinality=4)
    head = build_head(cfg, feature_dim, num_snippets, num_classes=3)
    return head, (lambda out, targets: tal_loss(out, targets, **cfg.loss_kwargs()))


@pytest.mark.parametrize("ckpt", [(), ALL_STAGES])
def test_scaled_estimate_matches_a_direct_joint_step(ckpt):
    torch.manual_seed(0)
    T, F, S = 6, 2, 32
    enc = _encoder(ckpt=ckpt, device="cpu")
    head, loss_fn = _head_and_loss(enc.feature_dim, T)
    enc_probes = tuple((t, measure_encoder(enc, t, F, S)) for t in (2, 3))
    head_probes = tuple(
        (b, measure_head(head, enc.feature_dim, T, synthetic_targets(b, T, T, 3), loss_fn, b)) for b in (2, 3))
    estimate = LevelMemory(T, enc_probes, head_probes)
    params = [*enc.parameters(), *enc.buffers(), *head.parameters(), *head.buffers()]
    enc.train(), head.train()
    for batch in (1, 4):
        targets = synthetic_targets(batch, T, T, 3)

        def step() -> torch.Tensor:
            # the batch is copied in, as measure_head does and a training step does
            frames = torch.randint(0, 256, (batch, T, F, S, S, 3), dtype=torch.uint8)
            copied = TALTargets(*(t.clone() for t in (targets.start, targets.end, targets.iou_map, targets.classes)))
            return loss_fn(head(enc(frames)), copied)["total"]

        direct = measure_step(step, params)
        assert estimate.saved_bytes(batch) == direct.saved_bytes
        assert estimate.activation_peak_bytes(batch) == direct.activation_peak_bytes
        # adding the encoder's and the head's peaks bounds the joint peak from above
        assert direct.peak_bytes <= estimate.peak_bytes(batch) <= 1.3 * direct.peak_bytes
