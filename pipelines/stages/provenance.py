"""Where an encoder's weights come from: the `external_data` field of an ActivityNet submission.

The ActivityNet evaluation server asks each submission whether it used data beyond the dataset's
own videos (e.g. Kinetics pre-training). Every stage that writes an encoder writes
`encoder_origin.json` beside its `encoder.pt`: `{"external": bool, "details": str}`.

- A checkpoint with no origin file beside it (a user's file, e.g. published Kinetics weights)
  is external; no checkpoint at all (random initialisation) is not.
- Stage 1 (`lofi pretrain`) is external when it starts from an external checkpoint or trains on
  a clip set of its own (`data.pretrain_shards`: Kinetics, or the demo's generated clips); on the
  TAL shards' own training videos it keeps its checkpoint's origin.
- Stage 2 (`lofi train`) trains on the TAL training subset: it keeps its checkpoint's origin.
- `lofi extract` copies the origin into the features manifest (`encoder.origin`) and `lofi detect`
  writes it as `external_data` (`used`, `details`).
"""

from __future__ import annotations

import json

from typing import Any

from pipelines.data.manifests import FeaturesManifest
from pipelines.storage import location

ORIGIN_FILE = "encoder_origin.json"
SCRATCH = {"external": False, "details": "encoder trained from random initialisation"}


def origin_path(checkpoint: str) -> str:
    """The origin file beside a checkpoint (a path or a URI)."""
    folder, _, _ = checkpoint.rpartition("/")
    return f"{folder}/{ORIGIN_FILE}" if folder else ORIGIN_FILE


def checkpoint_origin(checkpoint: str | None) -> dict[str, Any]:
    """The origin of the weights an encoder starts from (`encoder.checkpoint`)."""
    if not checkpoint:
        return dict(SCRATCH)
    sidecar = location(origin_path(checkpoint), "encoder.checkpoint")
    if sidecar.is_file():
        origin = sidecar.read_json()
        return {"external": bool(origin["external"]), "details": str(origin["details"])}
    return {"external": True, "details": f"encoder weights from {checkpoint} (not written by a lofi stage)"}


def trained_origin(checkpoint: str | None, external_clips: str | None = None) -> dict[str, Any]:
    """The origin of an encoder trained from `checkpoint`, on a clip set of its own when `external_clips`."""
    origin = checkpoint_origin(checkpoint)
    if not external_clips:
        return origin
    clips = f"stage 1 trained on the clip set {external_clips}"
    details = f"{origin['details']}; {clips}" if origin != SCRATCH else clips
    return {"external": True, "details": details}


def external_data(features_manifest: FeaturesManifest) -> dict[str, Any]:
    """The submission's `external_data` for detections from these features (older folders: unknown = used)."""
    origin = features_manifest.encoder_origin()
    if origin is None:
        return {"used": True, "details": "unknown: the features manifest records no encoder origin (re-run lofi "
                                         "extract to record it)"}
    return {"used": origin["external"], "details": f"{origin['details']}; features of {features_manifest.level}"}


def origin_file(checkpoint: str | None, external_clips: str | None = None) -> tuple[str, bytes]:
    """(file name, bytes) of the origin file a training stage writes beside its encoder."""
    return ORIGIN_FILE, json.dumps(trained_origin(checkpoint, external_clips), indent=1).encode()
