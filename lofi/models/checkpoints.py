"""Load encoder weights from torchvision, official TSM, or LoFi state dict files.

Every naming is first converted to torchvision's ResNet names (the names of `ResNet`):
- "torchvision": `conv1.weight`, `layer1.0.conv1.weight`, ..., `fc.weight` (ImageNet files).
- "tsm": mit-han-lab/temporal-shift-module checkpoints: `module.base_model.` before every
  backbone key, `.net.` inside each shifted conv (`layer1.0.conv1.net.weight`, the shift
  wrapper's child) and the classifier as `module.new_fc.*`.
- "mmaction2": open-mmlab/mmaction2 recognizers (`ResNetTSM` backbones): `backbone.` before every
  backbone key, every conv and its norm in a ConvModule (`conv1.conv.weight` + `conv1.bn.*` for
  torchvision's `conv1.weight` + `bn1.*`, `downsample.conv` / `downsample.bn` for `downsample.0` /
  `.1`), the shift wrapper's `.net` (around each block's `conv1.conv` with the default
  `shift_place="blockres"`, around whole blocks with "block") and the classifier as
  `cls_head.fc_cls.*`; the file's `meta` beside `state_dict` is ignored.
- "lofi": state dicts of this package's modules: a `VideoEncoder` (`backbone.*`) or a
  `ClipClassifier` (`encoder.backbone.*`, classifier `fc.*`).
"auto" picks the naming from the keys. A file holding a training checkpoint
(`{"state_dict": ...}` or `{"model": ...}`) is unwrapped. Files are read with
`weights_only=True`, so a pickle holding code is refused.

Loading is strict: a missing, unexpected or wrongly shaped key is a `CheckpointError` that
lists all of them. Two exceptions, both deliberate: the classifier (`fc.*` / `new_fc.*`) is
dropped when the model has none (an encoder keeps only the backbone), and a missing
`num_batches_tracked` (files older than PyTorch 0.4.1) is filled in by BatchNorm itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lofi.errors import LofiError

FORMATS = ("auto", "torchvision", "tsm", "mmaction2", "lofi")
_MAX_LISTED = 30
_TSM_SHIFTED_CONV = re.compile(r"^(layer\d+\.\d+\.conv1)\.net\.")
_MM_CONV_MODULE = re.compile(r"(^|\.)(conv\d|downsample)\.(conv|bn)\.")  # mmaction2's ConvModule children


class CheckpointError(LofiError):
    """A checkpoint file cannot be read or does not fit the encoder; lists every bad key."""

    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None,
                 mismatched: list[str] | None = None):
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


@dataclass
class LoadedCheckpoint:
    """What a load did: the naming used and the classifier keys left out (original names)."""

    path: str
    format: str
    dropped_keys: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a tensor dict from `path` (weights only), unwrapping training checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist; fix model.checkpoint")
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for bad files
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only PyTorch state dict ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); save it with torch.save(model.state_dict(), path)"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(
            f"{path}: holds no state dict (a mapping of names to tensors, possibly under 'state_dict' "
            f"or 'model'); save it with torch.save(model.state_dict(), path)"
        )
    return data


def detect_format(keys: list[str]) -> str:
    """The naming of a state dict, from its keys (see the module docstring)."""
    if any(k.startswith(("module.base_model.", "base_model.", "module.new_fc.")) for k in keys):
        return "tsm"
    if any(k.startswith("cls_head.") or (k.startswith("backbone.") and _MM_CONV_MODULE.search(k)) for k in keys):
        return "mmaction2"
    if any(k.startswith(("backbone.", "encoder.backbone.")) for k in keys):
        return "lofi"
    return "torchvision"


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def torchvision_name(key: str, fmt: str) -> str:
    """One checkpoint key in torchvision's naming; keys that fit no rule come back unchanged
    (and then show up as unexpected)."""
    if fmt == "tsm":
        key = _strip(key, ("module.",))
        if key.startswith("new_fc."):
            return "fc." + key[len("new_fc."):]
        key = _strip(key, ("base_model.",))
        return _TSM_SHIFTED_CONV.sub(r"\1.", key)
    if fmt == "mmaction2":
        return _mmaction2_name(key)
    if fmt == "lofi":
        return _strip(key, ("encoder.backbone.", "backbone."))
    return key


def _mmaction2_name(key: str) -> str:
    """mmaction2 -> torchvision: `backbone.layer1.0.conv1.conv.net.weight` -> `layer1.0.conv1.weight`,
    `backbone.conv1.bn.bias` -> `bn1.bias`, `...downsample.bn.*` -> `...downsample.1.*`."""
    if key.startswith("cls_head.fc_cls."):
        return "fc." + key[len("cls_head.fc_cls."):]
    parts = [p for p in _strip(key, ("backbone.",)).split(".") if p != "net"]  # TemporalShift's wrapped module
    for i in range(len(parts) - 2):
        module, kind = parts[i], parts[i + 1]
        if kind not in ("conv", "bn") or not (module == "downsample" or re.fullmatch(r"conv\d", module)):
            continue
        if module == "downsample":
            replaced = ["downsample", "0" if kind == "conv" else "1"]
        else:
            replaced = [module if kind == "conv" else "bn" + module[len("conv"):]]
        return ".".join(parts[:i] + replaced + parts[i + 2:])
    return ".".join(parts)


def _to_model_names(state: dict[str, Tensor], fmt: str) -> dict[str, tuple[str, Tensor]]:
    """torchvision name -> (original key, tensor)."""
    keys = list(state)
    if fmt == "torchvision" and keys and all(k.startswith("module.") for k in keys):
        # Saved from a DataParallel / DDP wrapper without unwrapping it.
        state = {k[len("module."):]: v for k, v in state.items()}
        return {k: ("module." + k, v) for k, v in state.items()}
    return {torchvision_name(k, fmt): (k, v) for k, v in state.items()}


def _listed(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title} ({len(items)}): {shown}{more}"


def load_backbone_checkpoint(model: nn.Module, path: str | Path, fmt: str = "auto") -> LoadedCheckpoint:
    """Load `path` into `model` (a `ResNet`), strictly; see the module docstring."""
    if fmt not in FORMATS:
        raise CheckpointError(f"checkpoint format {fmt!r} is not one of {list(FORMATS)}; fix model.checkpoint_format")
    state = read_state_dict(path)
    detected = detect_format(list(state))
    used = detected if fmt == "auto" else fmt
    named = _to_model_names(state, used)
    expected = model.state_dict()
    has_classifier = getattr(model, "fc", None) is not None
    dropped = sorted(orig for name, (orig, _) in named.items() if name.startswith("fc.") and not has_classifier)
    named = {n: kv for n, kv in named.items() if has_classifier or not n.startswith("fc.")}

    missing = sorted(k for k in expected if k not in named and not k.endswith("num_batches_tracked"))
    unexpected = sorted(orig for name, (orig, _) in named.items() if name not in expected)
    mismatched = sorted(
        f"{orig} {tuple(t.shape)} vs model {tuple(expected[name].shape)}"
        for name, (orig, t) in named.items() if name in expected and t.shape != expected[name].shape
    )
    if missing or unexpected or mismatched:
        parts = [_listed(t, v) for t, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if v]
        hint = f" (its keys look like {detected} naming)" if detected != used else ""
        raise CheckpointError(
            f"{path}: checkpoint read with {used} naming{hint} does not fit the encoder: " + "; ".join(parts)
            + ". Fix: set model.name and model.width to the checkpoint's network, or model.checkpoint_format",
            missing, unexpected, mismatched,
        )
    model.load_state_dict({name: t for name, (_, t) in named.items()}, strict=True)
    return LoadedCheckpoint(str(path), used, dropped)


def encoder_state(model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A model's state dict whose encoder sits under `encoder.` (stage 1's ClipClassifier, stage 2's
    TALModel) -> its VideoEncoder's (lofi naming: backbone.*), what encoder.pt files hold."""
    return {k[len("encoder."):]: v for k, v in model_state.items() if k.startswith("encoder.")}
