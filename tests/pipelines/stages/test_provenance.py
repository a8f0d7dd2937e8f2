"""Encoder origins: what a test-server submission declares as `external_data`."""

from __future__ import annotations

import json

from pipelines.data.manifests import FeaturesManifest
from pipelines.stages.provenance import ORIGIN_FILE, checkpoint_origin, external_data, trained_origin


def test_a_users_checkpoint_is_external_and_random_initialisation_is_not(tmp_path):
    kinetics = tmp_path / "TSM_kinetics.pth"
    kinetics.write_bytes(b"weights")
    assert checkpoint_origin(str(kinetics))["external"] is True
    assert str(kinetics) in checkpoint_origin(str(kinetics))["details"]
    assert checkpoint_origin(None)["external"] is False and checkpoint_origin("")["external"] is False


def test_a_stage_keeps_the_origin_written_beside_its_checkpoint(tmp_path):
    (tmp_path / "pretrain").mkdir()
    ckpt = tmp_path / "pretrain" / "encoder.pt"
    (tmp_path / "pretrain" / ORIGIN_FILE).write_text(json.dumps({"external": False, "details": "own videos"}))
    assert checkpoint_origin(str(ckpt)) == {"external": False, "details": "own videos"}
    # stage 2 on the TAL training subset: unchanged; stage 1 on a clip set of its own: external
    assert trained_origin(str(ckpt)) == {"external": False, "details": "own videos"}
    after_clips = trained_origin(str(ckpt), external_clips="/data/kinetics/prepared")
    assert after_clips["external"] is True and "/data/kinetics/prepared" in after_clips["details"]
    assert trained_origin(None, external_clips="clips")["external"] is True


def test_submissions_declare_the_features_origin_and_unknown_as_used():
    manifest = FeaturesManifest(level="full", encoder={"origin": {"external": False, "details": "from scratch"}})
    assert external_data(manifest) == {"used": False, "details": "from scratch; features of full"}
    assert external_data(FeaturesManifest(level="full", encoder={}))["used"] is True
