"""Loading encoder weights from torchvision, official-TSM and LoFi state dict files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lofi.config import ConfigError, from_dict
from lofi.errors import LofiError
from lofi.models import CheckpointError, ClipClassifier, EncoderConfig, build_encoder
from lofi.models.resnet import ResNet, tsm_resnet18, tsm_resnet34, tsm_resnet50


def source_network(factory, width: int = 8, seed: int = 0) -> ResNet:
    """A network with a classifier and non-default BN statistics, so every tensor is distinct."""
    torch.manual_seed(seed)
    net = factory(width=width, num_classes=10)
    for name, buf in net.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_()
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
        elif name.endswith("num_batches_tracked"):
            buf.fill_(7)
    return net


def tsm_naming(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision keys the way TSM's training code saves them (DataParallel wrapper,
    TSN's base_model, shift wrapper `.net` around every block's conv1, classifier new_fc)."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            out["module.new_fc." + key[3:]] = value
            continue
        parts = key.split(".")
        if parts[0].startswith("layer") and parts[2] == "conv1":
            parts.insert(3, "net")
        out["module.base_model." + ".".join(parts)] = value
    return out


def assert_backbone_equals(encoder, source: ResNet) -> None:
    loaded = encoder.backbone.state_dict()
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_torchvision_naming_loads_every_tensor_and_drops_the_classifier(tmp_path: Path):
    source = source_network(tsm_resnet18)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(source.state_dict(), path)
    encoder = build_encoder(EncoderConfig(name="tsm_resnet18", width=8, checkpoint=str(path)))
    assert_backbone_equals(encoder, source)
    assert encoder.checkpoint_info.format == "torchvision"
    assert encoder.checkpoint_info.dropped_keys == ["fc.bias", "fc.weight"]


def test_tsm_naming_in_a_training_checkpoint_loads(tmp_path: Path):
    source = source_network(tsm_resnet50)
    state = tsm_naming(source.state_dict())
    assert "module.base_model.layer1.0.conv1.net.weight" in state  # the naming the issue quotes
    path = tmp_path / "TSM_kinetics_RGB_resnet50.pth"
    torch.save({"epoch": 50, "arch": "resnet50", "state_dict": state, "best_prec1": 74.1}, path)
    for fmt in ("auto", "tsm"):
        encoder = build_encoder(EncoderConfig(name="tsm_resnet50", width=8, checkpoint=str(path), checkpoint_format=fmt))
        assert_backbone_equals(encoder, source)
        assert encoder.checkpoint_info.format == "tsm"
        assert encoder.checkpoint_info.dropped_keys == ["module.new_fc.bias", "module.new_fc.weight"]


def mmaction2_naming(state: dict[str, torch.Tensor], shift_place: str = "blockres") -> dict[str, torch.Tensor]:
    """Rename torchvision keys the way mmaction2's Recognizer2D + ResNetTSM saves them: `backbone.`, each
    conv and its BatchNorm as a ConvModule's `.conv` / `.bn`, the TemporalShift wrapper's `.net` around
    each block's conv1.conv ("blockres") or around the whole block ("block"), classifier cls_head.fc_cls."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            out["cls_head.fc_cls." + key[3:]] = value
            continue
        parts = key.split(".")
        if parts[0] in ("conv1", "bn1"):  # the stem: one ConvModule named conv1
            parts = ["conv1", "conv" if parts[0] == "conv1" else "bn", *parts[1:]]
        elif parts[2] == "downsample":
            parts = [*parts[:3], "conv" if parts[3] == "0" else "bn", *parts[4:]]
        else:
            layer, block, module, *rest = parts
            number = module[-1]
            parts = [layer, block, "conv" + number, "conv" if module.startswith("conv") else "bn", *rest]
            if shift_place == "blockres" and parts[2:4] == ["conv1", "conv"]:
                parts.insert(4, "net")
        if shift_place == "block" and parts[0].startswith("layer"):
            parts.insert(2, "net")
        out["backbone." + ".".join(parts)] = value
    return out


@pytest.mark.parametrize("factory, shift_place", [(tsm_resnet50, "blockres"), (tsm_resnet18, "blockres"),
                                                  (tsm_resnet18, "block")])
def test_mmaction2_naming_loads_every_tensor_and_drops_cls_head(tmp_path: Path, factory, shift_place):
    source = source_network(factory)
    state = mmaction2_naming(source.state_dict(), shift_place)
    if shift_place == "blockres":
        quoted = {"backbone.layer1.0.conv1.conv.net.weight", "backbone.layer2.0.downsample.bn.weight"}
    else:
        quoted = {"backbone.layer1.0.net.conv1.conv.weight", "backbone.layer2.0.net.downsample.bn.weight"}
    assert {*quoted, "backbone.conv1.bn.running_var", "cls_head.fc_cls.weight"} <= state.keys()  # the naming
    path = tmp_path / "tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb.pth"
    torch.save({"meta": {"epoch": 50, "mmaction_version": "1.2.0"}, "state_dict": state}, path)
    name = {tsm_resnet50: "tsm_resnet50", tsm_resnet18: "tsm_resnet18"}[factory]
    for fmt in ("auto", "mmaction2"):
        encoder = build_encoder(EncoderConfig(name=name, width=8, checkpoint=str(path), checkpoint_format=fmt))
        assert_backbone_equals(encoder, source)
        assert encoder.checkpoint_info.format == "mmaction2"
        assert encoder.checkpoint_info.dropped_keys == ["cls_head.fc_cls.bias", "cls_head.fc_cls.weight"]


def test_lofi_clip_classifier_checkpoint_loads_into_an_encoder(tmp_path: Path):
    torch.manual_seed(1)
    classifier = ClipClassifier(build_encoder(EncoderConfig(width=8, shift_div=4)), num_classes=5)
    path = tmp_path / "stage1.pt"
    torch.save(classifier.state_dict(), path)
    encoder = build_encoder(EncoderConfig(width=8, shift_div=4, checkpoint=str(path)))
    assert encoder.checkpoint_info.format == "lofi"
    for key, value in classifier.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key


def test_missing_and_unexpected_keys_are_all_listed(tmp_path: Path):
    state = source_network(tsm_resnet18).state_dict()
    del state["layer4.1.bn2.running_mean"]
    del state["layer2.0.downsample.0.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        build_encoder(EncoderConfig(width=8, checkpoint=str(path)))
    err = info.value
    assert isinstance(err, LofiError)
    assert err.missing == ["layer2.0.downsample.0.weight", "layer4.1.bn2.running_mean"]
    assert err.unexpected == ["layer5.0.conv1.weight"]
    for text in (str(path), "layer4.1.bn2.running_mean", "layer2.0.downsample.0.weight", "layer5.0.conv1.weight"):
        assert text in str(err)


def test_deeper_network_checkpoint_lists_extra_blocks_by_their_file_names(tmp_path: Path):
    path = tmp_path / "tsm_r34.pth"
    torch.save(tsm_naming(source_network(tsm_resnet34).state_dict()), path)
    with pytest.raises(CheckpointError) as info:
        build_encoder(EncoderConfig(name="tsm_resnet18", width=8, checkpoint=str(path)))
    # resnet34 has blocks 2 (layer1, layer4), 2-3 (layer2), 2-5 (layer3) beyond resnet18's.
    assert "module.base_model.layer1.2.conv1.net.weight" in info.value.unexpected
    assert "module.base_model.layer3.5.bn2.bias" in info.value.unexpected
    assert info.value.missing == []


def test_shape_mismatch_is_an_error(tmp_path: Path):
    path = tmp_path / "wide.pth"
    torch.save(source_network(tsm_resnet18, width=16).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"conv1.weight \(16, 3, 7, 7\) vs model \(8, 3, 7, 7\)") as info:
        build_encoder(EncoderConfig(width=8, checkpoint=str(path)))
    assert len(info.value.mismatched) > 0 and info.value.missing == [] and info.value.unexpected == []


def test_forced_wrong_format_says_which_naming_the_keys_have(tmp_path: Path):
    path = tmp_path / "tsm.pth"
    torch.save(tsm_naming(source_network(tsm_resnet18).state_dict()), path)
    with pytest.raises(CheckpointError, match="look like tsm naming"):
        build_encoder(EncoderConfig(width=8, checkpoint=str(path), checkpoint_format="torchvision"))


@dataclass
class NotAWeight:
    note: str = "pickled code object"


def test_unreadable_files_are_user_errors(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_encoder(EncoderConfig(width=8, checkpoint=str(tmp_path / "nope.pth")))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt"):
        build_encoder(EncoderConfig(width=8, checkpoint=str(text)))
    # weights_only=True refuses pickles that carry arbitrary objects.
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": tsm_resnet18(width=8).state_dict(), "extra": NotAWeight()}, unsafe)
    with pytest.raises(CheckpointError, match="weights-only"):
        build_encoder(EncoderConfig(width=8, checkpoint=str(unsafe)))


def test_config_rejects_bad_values_naming_the_key():
    cfg = from_dict(EncoderConfig, {"name": "tsm_resnet50", "activation_checkpointing": ["layer1", "layer3"]})
    assert cfg.activation_checkpointing == ("layer1", "layer3")
    for bad, key in (({"activation_checkpointing": ["layer5"]}, "activation_checkpointing"),
                     ({"name": "resnet101"}, "name"), ({"frozen_stages": 6}, "frozen_stages"),
                     ({"amp_dtype": "fp8"}, "amp_dtype"), ({"checkpoint_format": "timm"}, "checkpoint_format")):
        with pytest.raises(ConfigError, match=key):
            from_dict(EncoderConfig, bad)
