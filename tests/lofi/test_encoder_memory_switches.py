"""Memory switches: activation checkpointing, frozen BatchNorm, frozen stages, autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lofi.config import ConfigError
from lofi.models import EncoderConfig, VideoEncoder, build_encoder, normalize_frames
from lofi.models.resnet import CHECKPOINTABLE

STAGES = ("layer1", "layer2", "layer3", "layer4")


def clip_batch(seed: int = 0) -> torch.Tensor:
    """(B=1, T=2, F=2, C, H, W) normalised float frames."""
    gen = torch.Generator().manual_seed(seed)
    return normalize_frames(torch.randint(0, 256, (1, 2, 2, 32, 32, 3), dtype=torch.uint8, generator=gen))


def twin(cfg: EncoderConfig, source: VideoEncoder) -> VideoEncoder:
    encoder = build_encoder(cfg)
    encoder.load_state_dict(source.state_dict())
    return encoder


def bn_buffers(encoder: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in encoder.named_buffers() if "running" in k or "num_batches" in k}


def saved_bytes_in_forward(encoder: VideoEncoder, frames: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during the forward (distinct storages, no params)."""
    params = {p.untyped_storage().data_ptr() for p in encoder.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(frames)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["tsm_resnet18", "tsm_resnet50"])
def test_activation_checkpointing_same_outputs_grads_and_bn_stats(name: str):
    torch.manual_seed(0)
    plain = build_encoder(EncoderConfig(name=name, width=8)).train()
    ckpt = twin(EncoderConfig(name=name, width=8, activation_checkpointing=CHECKPOINTABLE), plain).train()
    frames = clip_batch()
    outs = []
    for encoder in (plain, ckpt):
        out = encoder(frames)
        out.square().mean().backward()
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    ckpt_params = dict(ckpt.named_parameters())
    for key, p in plain.named_parameters():
        assert torch.allclose(p.grad, ckpt_params[key].grad, rtol=1e-4, atol=1e-6), key
    # The recompute in backward must not move the running stats a second time.
    ckpt_bufs = bn_buffers(ckpt)
    for key, value in bn_buffers(plain).items():
        assert torch.allclose(value, ckpt_bufs[key], atol=1e-6), key
    assert int(ckpt_bufs["backbone.layer2.0.bn1.num_batches_tracked"]) == 1
    assert int(ckpt_bufs["backbone.bn1.num_batches_tracked"]) == 1


def test_activation_checkpointing_keeps_fewer_activations():
    torch.manual_seed(0)
    # The stem is frozen so that what is left is the stages' share (at 32 px the stem's
    # activations would otherwise be half of the total).
    plain = build_encoder(EncoderConfig(width=8, frozen_stages=1)).train()
    ckpt = twin(EncoderConfig(width=8, frozen_stages=1, activation_checkpointing=STAGES), plain).train()
    frames = clip_batch()
    assert saved_bytes_in_forward(ckpt, frames) < 0.25 * saved_bytes_in_forward(plain, frames)


def test_frozen_stages_get_no_gradient_and_keep_their_stats():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(width=8, frozen_stages=2)).train()
    before = bn_buffers(encoder)
    encoder(clip_batch()).square().mean().backward()
    after = bn_buffers(encoder)
    for key, p in encoder.named_parameters():
        frozen = key.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))
        assert p.requires_grad is not frozen, key
        assert (p.grad is None) is frozen, key
    for key in before:
        frozen = key.startswith(("backbone.bn1.", "backbone.layer1."))
        assert torch.equal(before[key], after[key]) is frozen, key


def test_freeze_bn_keeps_running_stats_after_a_training_forward():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(width=8, freeze_bn=True))
    encoder.train()  # must not switch BatchNorm back to batch statistics
    before = bn_buffers(encoder)
    encoder(clip_batch()).square().mean().backward()
    for key, value in bn_buffers(encoder).items():
        assert torch.equal(before[key], value), key
    # Only the statistics are frozen: the affine parameters still learn.
    assert encoder.backbone.layer3[0].bn1.weight.grad.abs().sum() > 0
    assert encoder.backbone.conv1.weight.grad.abs().sum() > 0


def test_bf16_autocast_runs_on_cpu_and_returns_float32():
    torch.manual_seed(0)
    full = build_encoder(EncoderConfig(width=16)).eval()
    bf16 = twin(EncoderConfig(width=16, amp_dtype="bf16"), full).eval()
    frames = clip_batch()
    with torch.no_grad():
        ref, out = full(frames), bf16(frames)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # bf16 keeps ~3 significant digits: same features up to rounding.
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    bf16.train()
    bf16(frames).square().mean().backward()
    assert bf16.backbone.conv1.weight.grad.dtype == torch.float32


def test_fp16_on_cpu_is_a_config_error():
    encoder = build_encoder(EncoderConfig(width=8, amp_dtype="fp16"))
    with pytest.raises(ConfigError, match="amp_dtype"):
        encoder(clip_batch())


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", ["fp16", "bf16"])
def test_cuda_autocast_with_checkpointing(amp_dtype: str):
    torch.manual_seed(0)
    cfg = EncoderConfig(name="tsm_resnet50", width=16, amp_dtype=amp_dtype, activation_checkpointing=("layer1", "layer2"))
    encoder = build_encoder(cfg).cuda().train()
    frames = torch.randint(0, 256, (1, 4, 2, 64, 64, 3), dtype=torch.uint8, device="cuda")
    out = encoder(frames)
    assert out.dtype == torch.float32 and out.shape == (1, 512, 4)
    out.square().mean().backward()
    assert torch.isfinite(encoder.backbone.conv1.weight.grad).all()


def test_checkpointing_halves_the_activation_peak_including_recompute():
    # The peak over forward and backward (recompute included) decides whether a step fits;
    # per-block recompute with the stem checkpointed keeps it well under half (measured on
    # the meta device: same bytes as on CPU, no compute).
    from lofi.memory import measure_encoder

    peaks = {}
    for stages in ((), CHECKPOINTABLE):
        encoder = build_encoder(EncoderConfig(width=16, activation_checkpointing=stages)).to("meta")
        peaks[stages] = measure_encoder(encoder, 2, 4, 64, device="meta").activation_peak_bytes
    assert peaks[CHECKPOINTABLE] < 0.5 * peaks[()]
