"""pipelines.storage: config strings -> local paths or object-store locations, and their errors,
against the loopback S3 server (`s3_server`)."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import pytest

from pipelines.storage import Location, StorageError, location, storage_error


@pytest.mark.parametrize("text, expected", [
    ("s3:/bucket/x", "lacks '//'"),
    ("hdfs://namenode/x", "scheme hdfs:// is not supported"),
    ("s3://", "names no bucket"),
    ("s3://bucket/x?region=eu-west-1", "options in the URI"),
    ("file://relative/x", "absolute path"),
    ("", "is empty"),
])
def test_unusable_uris_are_errors_naming_the_key_never_local_folders(text, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"^run\.storage: .*" + expected):
        location(text, "run.storage", output=True)
    assert list(tmp_path.iterdir()) == []  # nothing was created under the working directory


def test_local_paths_resolve_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert location("runs", "run.storage").uri == str(tmp_path / "runs")
    assert location(f"file://{tmp_path}/a/../b", "k").uri == str(tmp_path / "b")
    loc = location("runs", "run.storage") / "x" / "model.json"
    loc.write_json({"a": 1})
    assert loc.is_file() and loc.read_json() == {"a": 1}
    assert [p.name for p in (location("runs", "k") / "x").files("*.json")] == ["model.json"]
    assert list((tmp_path / "runs" / "x").iterdir()) == [tmp_path / "runs" / "x" / "model.json"]  # no scratch left


def test_object_locations_read_write_list_delete(s3_server):
    root = location(f"{s3_server}/{uuid.uuid4().hex}//unit/", "data.shards")
    assert root.uri.startswith("s3://lofi-test/") and not root.uri.endswith("/") and "//unit" not in root.uri
    (root / "a" / "x.json").write_json({"n": 1})
    (root / "a" / "b" / "y.bin").write_bytes(b"123")
    assert (root / "a" / "x.json").read_json() == {"n": 1}
    assert root.is_dir() and (root / "a" / "x.json").is_file() and not (root / "nothing").exists()
    assert [loc.uri for loc in (root / "a").files()] == [(root / "a" / "x.json").uri]
    assert [loc.name for loc in root.files(recursive=True)] == ["y.bin", "x.json"]
    with (root / "a" / "b" / "y.bin").as_local_file() as path:
        assert path.read_bytes() == b"123"
    copy = (root / "a" / "b" / "y.bin").local_copy()
    assert copy.read_bytes() == b"123" and copy == (root / "a" / "b" / "y.bin").local_copy()
    root.delete()
    assert not root.exists() and root.files(recursive=True) == []


def test_missing_bucket_is_a_clear_error(s3_server):
    missing = location("s3://no-such-bucket-lofi/x", "run.storage")
    with pytest.raises(StorageError, match=r"run\.storage: bucket 'no-such-bucket-lofi' .* does not exist .*endpoint"):
        missing.check_bucket()
    with pytest.raises(StorageError, match=r"run\.storage: cannot write .*does not exist"):
        (missing / "a.json").write_json({})


def test_unreachable_endpoint_is_a_clear_error(monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(StorageError, match=r"data\.shards: cannot .* cannot be reached .*AWS_ENDPOINT_URL"):
        location("s3://lofi-test/x", "data.shards").check_bucket()


def test_an_output_inside_a_ray_jobs_working_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the entrypoint
    with pytest.raises(StorageError, match=r"run\.storage: 'runs' .* Ray deletes .* absolute path .*s3://"):
        location("runs", "run.storage", output=True)
    with pytest.raises(StorageError, match="working directory of this Ray job"):
        location(str(tmp_path / "abs"), "run.storage", output=True)
    assert location("runs", "data.annotations").uri == str(tmp_path / "runs")  # inputs may come with the job
    assert location("s3://b/x", "run.storage", output=True).uri == "s3://b/x"
    assert location(str(tmp_path.parent / "elsewhere"), "run.storage", output=True).is_local


def test_local_path_of_an_object_location_names_the_key():
    with pytest.raises(StorageError, match=r"run\.storage: s3://b/x/features is an object-store URI"):
        (Location("s3://b/x", "run.storage") / "features").local_path()
    assert Location("/tmp/x", "k").local_path() == Path("/tmp/x")


# ---- whole stages on the loopback bucket ----------------------------------------------------

SMOKE = Path(__file__).resolve().parents[2] / "deploy" / "configs" / "pipeline" / "demo_smoke.yaml"
# the four levels demo_smoke.yaml trains and validates on (its fidelity overrides)
SMOKE_LEVELS = [{"preset": "full", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 32},
                {"preset": "s_lofi", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 16},
                {"preset": "t_lofi", "num_snippets": 4, "frames_per_snippet": 2, "size_px": 32},
                {"preset": "st_lofi", "num_snippets": 6, "frames_per_snippet": 2, "size_px": 24}]


def _objects(prefix_uri: str) -> dict[str, dict]:
    """Key (below the prefix) -> boto3's object entry, listed from the server itself."""
    import boto3

    bucket, prefix = prefix_uri.removeprefix("s3://").split("/", 1)
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {obj["Key"][len(prefix) + 1:]: obj for page in pages for obj in page.get("Contents", [])}


@pytest.fixture(scope="module")
def s3_prepared(ray_cluster, s3_server, tiny_tal_videos, tmp_path_factory) -> str:
    """`lofi prepare` of the tiny TAL videos into the bucket, once for the module: the run root
    (its `prepared/` holds the shards)."""
    import yaml

    from lofi_cli.commands import main

    root = f"{s3_server}/{uuid.uuid4().hex}"
    prepare_yaml = tmp_path_factory.mktemp("s3_prepare") / "prepare.yaml"
    prepare_yaml.write_text(yaml.safe_dump({
        "input": {"annotations": str(tiny_tal_videos / "annotations.json"), "videos": str(tiny_tal_videos / "videos")},
        "output": f"{root}/prepared", "levels": SMOKE_LEVELS, "num_workers": 2, "videos_per_part": 3,
        "max_error_fraction": 0.0}))
    assert main(["prepare", "--config", str(prepare_yaml), "--quiet"]) == 0
    return root


@pytest.mark.ray
@pytest.mark.slow
def test_prepare_and_train_on_s3_then_resume_from_the_bucket(s3_prepared):
    from pipelines.data import shards, tensors
    from lofi_cli.commands import main

    root = s3_prepared

    # the shards are objects in the bucket: parts, their records, the manifest; nothing in flight left
    prepared = _objects(f"{root}/prepared")
    manifest = shards.read_manifest(f"{root}/prepared")
    listed = {rel for level in manifest.levels for rel in level.shards}
    assert {"manifest.json", "prepare_config.json"} <= set(prepared) and listed
    assert {key for key in prepared if key.endswith(".parquet")} == listed
    assert len([key for key in prepared if key.startswith("_parts/")]) == 2  # 6 videos, 3 per part
    assert not any(key.startswith(".tmp") for key in prepared)
    table = shards.read_level_table(f"{root}/prepared", "full")  # plain pyarrow through pyarrow.fs
    assert table.num_rows == 6 and tensors.frames_array(table).shape == (6, 8, 2, 32, 32, 3)
    rows = shards.read_level_dataset(f"{root}/prepared", "t_lofi", columns=("video_id", "frames")).take_all()  # Ray Data
    assert sorted(row["video_id"] for row in rows) == table.column("video_id").to_pylist()
    assert rows[0]["frames"].shape == (4, 2, 32, 32, 3)

    # stage 2 with data.shards and run.storage in the bucket (MLflow: test_mlflow_artifacts_land_in_the_bucket)
    train = ["train", "--config", str(SMOKE), "--set", f"data.shards={root}/prepared", "--set",
             f"run.storage={root}/runs", "--set", "run.name=s3", "--set", "tracking.enabled=false"]
    assert main([*train, "--set", "train.epochs=1"]) == 0
    runs = _objects(f"{root}/runs/s3")
    assert {"train/encoder.pt", "train/model.pt", "train/model.json"} <= set(runs)
    first = runs["ray/train/epoch-0000/state.pt"]

    # the same run name and storage, one more epoch: resumes from the checkpoint in the bucket
    assert main([*train, "--set", "train.epochs=2"]) == 0
    runs = _objects(f"{root}/runs/s3")
    assert runs["ray/train/epoch-0000/state.pt"]["ETag"] == first["ETag"]  # epoch 0 was not trained again
    assert runs["ray/train/epoch-0000/state.pt"]["LastModified"] == first["LastModified"]
    assert "ray/train/epoch-0001/state.pt" in runs
    assert (location(f"{root}/runs/s3/train/model.json", "k").read_json())["epochs"] == 2


@pytest.mark.ray
@pytest.mark.slow
def test_extract_train_head_and_detect_on_s3_commit_by_manifest(s3_prepared, tiny_tal_videos, tmp_path):
    import shutil

    import torch

    from lofi.models.encoders import EncoderConfig, build_encoder
    from lofi_cli.commands import main
    from pipelines.data.features import FEATURES_MANIFEST, features_dataset, read_features

    # the encoder checkpoint is an object too (its sha1 goes into the manifest)
    torch.manual_seed(0)
    local_ckpt = tmp_path / "encoder.pt"
    torch.save(build_encoder(EncoderConfig(name="tsm_resnet18", width=8, shift_div=4)).state_dict(), local_ckpt)
    ckpt = location(f"{s3_prepared}/ckpt/encoder.pt", "k")
    ckpt.upload(local_ckpt)
    runs = f"{s3_prepared}/runs"
    # a failed earlier extraction's parts and an older manifest: the new commit supersedes and removes them
    stale = location(f"{runs}/feat/features", "k")
    (stale / "attempt-old" / "part-0.parquet").write_bytes(b"not parquet")
    (stale / "part-older.parquet").write_bytes(b"not parquet")
    (stale / FEATURES_MANIFEST).write_json({"files": ["part-older.parquet"]})
    common = ["--config", str(SMOKE), "--set", f"data.shards={s3_prepared}/prepared", "--set", "run.name=feat",
              "--set", f"data.annotations={tiny_tal_videos / 'annotations.json'}", "--set", "tracking.enabled=false"]
    on_s3 = [*common, "--set", f"run.storage={runs}"]
    assert main(["extract", *on_s3, "--set", f"encoder.checkpoint={ckpt}", "--set", "extract.write_npy=true",
                 "--quiet"]) == 0
    assert main(["train-head", *on_s3]) == 0
    assert main(["detect", *on_s3]) == 0

    objects = _objects(f"{runs}/feat")
    manifest = location(f"{runs}/feat/features/{FEATURES_MANIFEST}", "k").read_json()
    parts = {key.removeprefix("features/") for key in objects if key.startswith("features/") and key.endswith(".parquet")}
    assert parts == set(manifest["files"]) and len(parts) >= 1  # exactly the listed parts; the stale ones are gone
    npy = {key for key in objects if key.startswith(f"features/{manifest['npy_dir']}/")}
    assert len(npy) == manifest["counts"]["videos"] == 6
    assert manifest["encoder"]["checkpoint"] == ckpt.uri and len(manifest["encoder"]["checkpoint_sha1"]) == 40
    assert manifest["shards"] == f"{s3_prepared}/prepared"
    assert read_features(f"{runs}/feat/features").num_rows == 6
    val = manifest["counts"]["per_subset"]["validation"]
    assert features_dataset(f"{runs}/feat/features", "validation").count() == val  # Ray Data through pyarrow.fs
    assert {"head/model.pt", "head/model.json", "detect/predictions.json", "detect/eval.json"} <= set(objects)
    result = location(f"{runs}/feat/detect/eval.json", "k").read_json()
    assert 0.0 <= result["average_mAP"] <= 1.0
    assert location(f"{runs}/feat/detect/predictions.json", "k").read_json()["results"]

    # the same detect on a local copy of the bucket's features and head scores the same
    local = tmp_path / "runs" / "feat"
    for key in [FEATURES_MANIFEST, *manifest["files"], "../head/model.pt"]:
        target = (local / "features" / key).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(location(f"{runs}/feat/features/{key}".replace("/features/../", "/"), "k").local_copy(), target)
    assert main(["detect", *common, "--set", f"run.storage={tmp_path / 'runs'}"]) == 0
    assert json.loads((local / "detect" / "eval.json").read_text()) == result


def test_mlflow_artifacts_land_in_the_bucket(s3_server, tmp_path):
    from pipelines.tracking import Tracker, TrackingConfig

    root = f"{s3_server}/{uuid.uuid4().hex}/mlartifacts"
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="s3 artifacts",
                         artifact_location=root)
    with Tracker.start(cfg, "run") as tracker:
        tracker.log_bytes(b'{"a": 1}', "eval.json")
        run_id = tracker.run_id
    keys = _objects(f"{root}/s3_artifacts")  # the experiment's folder: its name made path-safe
    assert f"{run_id}/artifacts/eval.json" in keys
    assert location(f"{root}/s3_artifacts/{run_id}/artifacts/eval.json", "k").read_json() == {"a": 1}


def test_a_ray_jobs_default_mlflow_database_is_refused(tmp_path, monkeypatch):
    from lofi.config import ConfigError
    from pipelines.tracking import Tracker, TrackingConfig
    from pipelines.tracking.config import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ConfigError, match=r"default tracking URI: sqlite:///mlflow.db .* Ray deletes .*tracking server"):
        resolve_tracking_uri(TrackingConfig())
    with pytest.raises(ConfigError, match="tracking.tracking_uri: sqlite:///runs/m.db"):
        Tracker.start(TrackingConfig(tracking_uri="sqlite:///runs/m.db"), "run")  # raised, not a warning
    elsewhere = tmp_path.parent / "m.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri=f"sqlite:///{elsewhere}")) == f"sqlite:///{elsewhere}"
    with pytest.raises(ValueError, match=r"artifact_location: .*lacks '//'"):
        TrackingConfig(artifact_location="s3:/bucket")


def test_run_storage_and_shards_take_uris_and_refuse_malformed_ones():
    from lofi.config import ConfigError, from_dict
    from lofi.errors import LofiError
    from pipelines.config import PipelineConfig

    cfg = from_dict(PipelineConfig, {"run": {"storage": "s3://bucket/runs/", "name": "exp"},
                                     "data": {"shards": "gs://bucket/prepared"}})
    assert cfg.run.ray_storage() == "s3://bucket/runs/exp/ray"  # Ray Train's storage_path: the URI itself
    assert str(cfg.run.stage_location("train") / "encoder.pt") == "s3://bucket/runs/exp/train/encoder.pt"
    with pytest.raises(LofiError, match=r"run\.storage: s3://bucket/runs/ is an object-store URI, but a local path"):
        cfg.run.dir()
    with pytest.raises(ConfigError, match=r"run.*storage: 's3:/bucket' looks like a URI"):
        from_dict(PipelineConfig, {"run": {"storage": "s3:/bucket"}})
    with pytest.raises(ConfigError, match=r"data.*shards: scheme hdfs://"):
        from_dict(PipelineConfig, {"data": {"shards": "hdfs://nn/x"}})


def test_refused_credentials_say_which_variables_to_set():
    # the message pyarrow's S3 client gives for a request without valid credentials (the loopback
    # server accepts any key, so the mapping is checked on the error text itself)
    err = OSError("When initiating multiple part upload for key 'x/a.json' in bucket 'b': AWS Error ACCESS_DENIED "
                  "during CreateMultipartUpload operation: Access Denied")
    message = str(storage_error(Location("s3://b/x/a.json", "run.storage"), "write", err))
    assert message.startswith("run.storage: cannot write s3://b/x/a.json: When initiating")
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message and "every Ray node" in message
