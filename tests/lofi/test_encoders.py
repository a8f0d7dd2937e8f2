"""TSM-ResNet encoders: temporal shift, shapes, architecture, input convention, clip classifier."""

from __future__ import annotations

import pytest
import torch

from lofi.models import ENCODERS, ClipClassifier, EncoderConfig, build_encoder, normalize_frames, temporal_shift
from lofi.models.encoders import collapsed_levels
from lofi.models.resnet import tsm_resnet18, tsm_resnet34, tsm_resnet50

# Feature dim by hand: last stage has 8 * width channels, times 4 for the bottleneck.
TINY_WIDTH = 8
FEATURE_DIM = {"tsm_resnet18": 64, "tsm_resnet34": 64, "tsm_resnet50": 256}


def uint8_frames(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def test_temporal_shift_hand_worked_one_clip():
    # x[f, c] = 10 * f + c + 1 over 3 frames, 4 channels; shift_div 4 -> fold 1:
    # channel 0 takes the next frame, channel 1 the previous one, channels 2-3 stay.
    x = torch.tensor([[1.0, 2, 3, 4], [11, 12, 13, 14], [21, 22, 23, 24]]).view(3, 4, 1, 1)
    before = x.clone()
    out = temporal_shift(x, num_frames=3, shift_div=4)
    expected = torch.tensor([[11.0, 0, 3, 4], [21, 2, 13, 14], [0, 12, 23, 24]]).view(3, 4, 1, 1)
    assert torch.equal(out, expected)
    assert torch.equal(x, before)


def test_temporal_shift_stays_inside_each_clip():
    # Two clips of two frames, 8 channels, default shift_div 8 -> fold 1.
    # x[n, f, c] = 100 * n + 10 * f + c + 1; spatial 2x1 with equal values.
    n_idx = torch.arange(2).view(2, 1, 1)
    f_idx = torch.arange(2).view(1, 2, 1)
    c_idx = torch.arange(8).view(1, 1, 8)
    x = (100 * n_idx + 10 * f_idx + c_idx + 1).float().view(4, 8, 1, 1).expand(4, 8, 2, 1).contiguous()
    out = temporal_shift(x, num_frames=2).view(2, 2, 8, 2, 1)[..., 0, 0]
    # Channel 0 <- next frame, zero at the clip's last frame (not the next clip's first frame).
    assert out[:, :, 0].tolist() == [[11.0, 0.0], [111.0, 0.0]]
    # Channel 1 <- previous frame, zero at the clip's first frame.
    assert out[:, :, 1].tolist() == [[0.0, 2.0], [0.0, 102.0]]
    # Channels 2..7 unchanged.
    assert out[0, 1, 2:].tolist() == [13.0, 14, 15, 16, 17, 18]
    assert out[1, 0, 2:].tolist() == [103.0, 104, 105, 106, 107, 108]


def test_temporal_shift_rejects_partial_clip():
    with pytest.raises(ValueError, match="whole number of clips"):
        temporal_shift(torch.zeros(5, 8, 1, 1), num_frames=2)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_output_shape_per_number_of_snippets(name: str):
    encoder = build_encoder(EncoderConfig(name=name, width=TINY_WIDTH)).eval()
    with torch.no_grad():
        for num_snippets in (25, 50, 100):
            out = encoder(uint8_frames(1, num_snippets, 2, 32, 32, 3))
            assert out.shape == (1, FEATURE_DIM[name], num_snippets)
            assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_output_shape_per_frame_size(name: str):
    encoder = build_encoder(EncoderConfig(name=name, width=TINY_WIDTH)).eval()
    with torch.no_grad():
        for size_px in (112, 158, 224):
            frames = normalize_frames(uint8_frames(2, 2, 2, size_px, size_px, 3))  # float (B, T, F, C, H, W)
            assert encoder(frames).shape == (2, FEATURE_DIM[name], 2)


def test_layer_counts_and_stride_placement():
    counts = {f: [len(getattr(f(width=8), f"layer{i}")) for i in range(1, 5)]
              for f in (tsm_resnet18, tsm_resnet34, tsm_resnet50)}
    assert counts == {tsm_resnet18: [2, 2, 2, 2], tsm_resnet34: [3, 4, 6, 3], tsm_resnet50: [3, 4, 6, 3]}
    r50 = tsm_resnet50(width=8)
    # torchvision v1.5: the stride of a downsampling bottleneck sits on its 3x3 conv.
    assert r50.layer2[0].conv1.stride == (1, 1) and r50.layer2[0].conv2.stride == (2, 2)
    assert r50.layer2[0].downsample[0].stride == (2, 2)


def test_parameter_count_matches_torchvision():
    # torchvision's published totals with the 1000-class ImageNet classifier.
    assert sum(p.numel() for p in tsm_resnet18(num_classes=1000).parameters()) == 11_689_512
    assert sum(p.numel() for p in tsm_resnet50(num_classes=1000).parameters()) == 25_557_032


def test_normalize_frames_values_and_layout():
    frames = torch.zeros(1, 2, 3, 3, dtype=torch.uint8)  # (N, H, W, C)
    frames[0, 1, 2] = torch.tensor([255, 0, 128], dtype=torch.uint8)
    out = normalize_frames(frames)
    assert out.shape == (1, 3, 2, 3) and out.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert out[0, :, 1, 2].tolist() == pytest.approx(expected, rel=1e-5)
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, rel=1e-5)


def test_uint8_and_normalised_float_inputs_agree():
    encoder = build_encoder(EncoderConfig(width=TINY_WIDTH)).eval()
    frames = uint8_frames(1, 3, 2, 32, 32, 3)
    float_frames = (frames.float() / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    float_frames = float_frames.permute(0, 1, 2, 5, 3, 4)  # (B, T, F, H, W, C) -> (B, T, F, C, H, W)
    with torch.no_grad():
        assert torch.allclose(encoder(frames), encoder(float_frames), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        encoder(frames.float())  # float frames must be channels first


def test_snippets_do_not_mix_but_frames_of_a_snippet_do():
    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(width=TINY_WIDTH)).eval()
    frames = uint8_frames(1, 2, 2, 32, 32, 3)
    changed = frames.clone()
    changed[0, 1] = 255 - changed[0, 1]  # change every frame of snippet 1
    with torch.no_grad():
        a, b = encoder(frames), encoder(changed)
        assert torch.allclose(a[:, :, 0], b[:, :, 0])
        assert not torch.allclose(a[:, :, 1], b[:, :, 1])
        # Per-frame features: with the shift, frame 0 sees frame 1; without it, it does not.
        clip, other = normalize_frames(frames[0, 0]), normalize_frames(changed[0, 1])
        mixed = torch.stack([clip[0], other[1]])  # frame 1 replaced
        for shift_div, should_change in ((8, True), (0, False)):
            net = tsm_resnet18(width=TINY_WIDTH, shift_div=shift_div).eval()
            f0, f0_mixed = net.forward_features(clip, 2)[0], net.forward_features(mixed, 2)[0]
            assert torch.allclose(f0, f0_mixed) is not should_change


def test_chunked_extraction_matches_one_batch():
    encoder = build_encoder(EncoderConfig(width=TINY_WIDTH)).eval()
    frames = uint8_frames(2, 5, 2, 32, 32, 3)
    with torch.no_grad():
        assert torch.allclose(encoder(frames), encoder(frames, chunk_snippets=3), atol=1e-5)


def test_gradients_reach_conv1_end_to_end():
    encoder = build_encoder(EncoderConfig(width=TINY_WIDTH)).train()
    encoder(uint8_frames(1, 3, 2, 32, 32, 3)).square().mean().backward()
    grad = encoder.backbone.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_clip_classifier_logits_and_training_signal():
    torch.manual_seed(0)
    model = ClipClassifier(build_encoder(EncoderConfig(name="tsm_resnet50", width=TINY_WIDTH)), num_classes=7)
    clips = normalize_frames(uint8_frames(3, 4, 32, 32, 3))  # (B, F, C, H, W)
    logits = model(clips)
    assert logits.shape == (3, 7)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    assert model.encoder.backbone.conv1.weight.grad.abs().sum() > 0
    assert model(uint8_frames(2, 4, 32, 32, 3)).shape == (2, 7)  # uint8 (B, F, H, W, C) too


def test_state_dict_names_are_torchvision_names():
    # resnet18: 20 convs (stem + 8 blocks x 2 + 3 downsamples) and 20 BNs (weight, bias,
    # running_mean, running_var, num_batches_tracked) + fc weight/bias = 20 + 100 + 2 keys.
    # resnet50: 53 convs and 53 BNs (stem + 16 blocks x 3 + 4 downsamples) -> 53 + 265 + 2.
    r18, r50 = tsm_resnet18(width=8, num_classes=10).state_dict(), tsm_resnet50(width=8, num_classes=10).state_dict()
    assert (len(r18), len(r50)) == (122, 320)
    assert [k for k in r18 if k.startswith("layer2.0.")] == [
        "layer2.0.conv1.weight", "layer2.0.bn1.weight", "layer2.0.bn1.bias", "layer2.0.bn1.running_mean",
        "layer2.0.bn1.running_var", "layer2.0.bn1.num_batches_tracked", "layer2.0.conv2.weight",
        "layer2.0.bn2.weight", "layer2.0.bn2.bias", "layer2.0.bn2.running_mean", "layer2.0.bn2.running_var",
        "layer2.0.bn2.num_batches_tracked", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight",
        "layer2.0.downsample.1.bias", "layer2.0.downsample.1.running_mean", "layer2.0.downsample.1.running_var",
        "layer2.0.downsample.1.num_batches_tracked",
    ]
    assert r50["layer1.0.downsample.0.weight"].shape == (32, 8, 1, 1)
    assert r50["layer4.2.conv3.weight"].shape == (256, 64, 1, 1) and r50["fc.weight"].shape == (10, 256)


def _last_map_side(net: torch.nn.Module, size_px: int) -> int:
    """The last stage's map, measured by running the stages (not from the strides)."""
    sides = []
    net.layer4[-1].register_forward_hook(lambda _m, _i, out: sides.append(out.shape[-1]))
    with torch.no_grad():
        net.forward_features(torch.zeros(4, 3, size_px, size_px), num_frames=4)
    return sides[0]


# By hand: the stem divides by 4 (ceil), each stride-2 stage by 2 (ceil); 45 px -> 23 -> 12 -> ...
@pytest.mark.parametrize("output_stride,size_px,side", [
    (32, 64, 2), (32, 45, 2), (32, 32, 1), (16, 64, 4), (16, 45, 3), (16, 32, 2), (8, 32, 4),
])
def test_output_stride_sets_the_last_map(output_stride: int, size_px: int, side: int):
    net = tsm_resnet18(width=TINY_WIDTH, output_stride=output_stride).eval()
    assert _last_map_side(net, size_px) == side


def test_output_stride_keeps_the_parameters_so_checkpoints_load_across_it():
    standard = tsm_resnet18(width=TINY_WIDTH)
    small_frames = tsm_resnet18(width=TINY_WIDTH, output_stride=16)
    assert {k: v.shape for k, v in standard.state_dict().items()} == \
        {k: v.shape for k, v in small_frames.state_dict().items()}
    small_frames.load_state_dict(standard.state_dict(), strict=True)
    with pytest.raises(ValueError, match="output_stride: 12"):
        EncoderConfig(output_stride=12)


def test_levels_whose_last_map_collapses_are_named():
    sizes = {"s_lofi": 32, "st_lofi": 45, "full": 64}
    warned = collapsed_levels(EncoderConfig(), sizes, full_px=64)
    assert len(warned) == 1 and "'s_lofi' at 32 px" in warned[0] and "output_stride=16" in warned[0]
    assert collapsed_levels(EncoderConfig(output_stride=16), sizes, full_px=64) == []
    # Frames so small that the full level's map is 1x1 too: training and extraction see the same map.
    assert collapsed_levels(EncoderConfig(), {"s_lofi": 16}, full_px=32) == []
