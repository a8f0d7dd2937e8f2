"""The training stages for real on the shared Ray cluster (Ray Train V2, CPU, gloo).

Data: the `synth_small` videos prepared at tiny levels (T <= 8, F = 2, S = 32). Its two
validation videos are corrupt, so the runs validate on the training videos (val_subset:
training): the tests check the mechanics, not generalisation. Stage 2 runs short-cycle C-LoFi
(every 2 batches) at one batch per level pass: an epoch is S, T, ST steps in some order, which
the 2-worker and the killed runs must replay. Fits, the expensive part (~20-40 s each here):
pretrain 1, train 3 (the 1-worker run is the baseline of the 2-worker run and of the killed
one), train-head 2.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lofi.config import apply_overrides, from_dict
from lofi.errors import LofiError
from lofi.heads import build_head
from lofi.models.encoders import EncoderConfig, build_encoder
from pipelines.config import PipelineConfig
from pipelines.data.prepare import PrepareConfig, run as prepare

pytestmark = pytest.mark.ray

GRIDS = {"s_lofi": (8, 32), "t_lofi": (4, 32), "st_lofi": (6, 32)}  # name -> (T, S); F = 2 everywhere
LEVELS = [{"name": n, "num_snippets": t, "frames_per_snippet": 2, "size_px": s} for n, (t, s) in GRIDS.items()]
# a level whose rows are half videos (chunks): what `lofi train` must refuse
LEVELS.append({"name": "full", "num_snippets": 8, "frames_per_snippet": 2, "size_px": 32, "snippets_per_row": 4})
NUM_TRAIN_VIDEOS = 6  # synth_small's intact videos, all in "training"


@pytest.fixture(scope="module")
def shards_dir(ray_cluster, synth_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_shards") / "shards"
    prepare(from_dict(PrepareConfig, {"input": {"annotations": str(synth_small / "annotations.json"),
                                                "videos": str(synth_small / "videos")},
                                      "output": str(out), "levels": LEVELS, "num_workers": 2, "videos_per_part": 3}),
            verbose=False)
    return out


def make_cfg(shards: Path, storage: Path, name: str, *overrides: str) -> PipelineConfig:
    base = {
        "run": {"name": name, "storage": str(storage), "seed": 5},
        "data": {"shards": str(shards), "pretrain_level": "s_lofi", "full_level": "s_lofi", "val_subset": "training"},
        # freeze_bn: BatchNorm batch statistics would differ between 1 and 2 workers
        "encoder": {"width": 8, "freeze_bn": True},
        "head": {"name": "bmn", "hidden": 16, "num_sample": 4},
        "fidelity": {"kind": "c_lofi", "cycle": "batches", "every_batches": 2,
                     "overrides": {n: {"num_snippets": t, "frames_per_snippet": 2, "size_px": s}
                                   for n, (t, s) in GRIDS.items()}},
        "pretrain": {"epochs": 1, "batch_size": 16, "lr": 0.01},
        "train": {"epochs": 2, "batch_size": NUM_TRAIN_VIDEOS, "lr": 0.05},
        "train_head": {"optimizer": "adamw", "lr": 0.003, "epochs": 2, "batch_size": 4},
        "tracking": {"enabled": False},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
    }
    return from_dict(PipelineConfig, apply_overrides(base, overrides))


@pytest.fixture(scope="module")
def pretrained(shards_dir, tmp_path_factory):
    from pipelines.stages.pretrain import run

    storage = tmp_path_factory.mktemp("runs")
    cfg = make_cfg(shards_dir, storage, "stage1")
    return cfg, run(cfg)


def test_pretrain_writes_an_encoder_the_next_stage_loads(pretrained):
    cfg, result = pretrained
    encoder_path = Path(result.artifacts["encoder"])
    assert encoder_path == cfg.run.dir() / "pretrain" / "encoder.pt"
    encoder = build_encoder(EncoderConfig(width=8, checkpoint=str(encoder_path), checkpoint_format="lofi"))
    assert encoder.checkpoint_info.format == "lofi" and not encoder.checkpoint_info.dropped_keys
    classes = json.loads((encoder_path.parent / "classes.json").read_text())["classes"]
    manifest = json.loads((Path(cfg.data.shards) / "manifest.json").read_text())
    assert classes == manifest["labels"] + ["background"]
    m = result.metrics
    assert m["epoch"] == 0 and m["loss_total"] > 0 and m["clips_per_sec"] > 0 and m["frames_per_sec"] > 0
    assert 0.0 <= m["val_accuracy"] <= 1.0 and m["peak_memory_bytes"] > 0
    # every training snippet is a clip: 6 videos x 8 snippets at s_lofi, background included
    assert m["val_clips"] == NUM_TRAIN_VIDEOS * 8
    assert m["rows_read_train"] == NUM_TRAIN_VIDEOS * 8  # 3 full batches of 16: every training clip once
    assert m["data_wait_sec"] >= 0 and 0 <= m["data_wait_share"] < 1


@pytest.fixture(scope="module")
def one_worker(shards_dir, pretrained, tmp_path_factory):
    """The 1-worker baseline at global batch 6 (one step per epoch), tracked in MLflow (SQLite)."""
    from pipelines.stages.train import run

    storage = tmp_path_factory.mktemp("runs")
    cfg = make_cfg(shards_dir, storage, "w1", f"encoder.checkpoint={pretrained[1].artifacts['encoder']}",
                   "tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{storage}/mlflow.db",
                   "run.keep_checkpoints=1")
    return cfg, run(cfg)


def test_train_follows_the_schedule_and_writes_encoder_and_model(one_worker):
    cfg, result = one_worker
    m = result.metrics
    for key in ("loss_total", "loss_boundary", "loss_iou_cls", "loss_iou_reg", "loss_classes", "val_loss_total",
                "lr", "lr_encoder", "videos_per_sec", "frames_per_sec", "peak_memory_bytes"):
        assert np.isfinite(m[key]), key
    # short-cycle C-LoFi: an epoch reads the 6 videos once at each level, one batch of 6 per level pass.
    # Epoch 1 starts at global batch 3 (2-batch slot 1: T), then slot 2 (ST), then slot 2 again but ST's
    # pass is done, so the turn goes on to S: T, ST, S.
    assert m["epoch"] == 1 and m["global_batch"] == 6
    assert (m["level_num_snippets"], m["level_size_px"]) == (8, 32)  # the level epoch 1 ended with
    # what was read, per level: one pass each, and nothing beyond the rows trained on (3 steps of 6 videos)
    read = {level: m[f"rows_read_{level}"] for level in GRIDS}
    assert read == {level: NUM_TRAIN_VIDEOS for level in GRIDS}
    assert sum(read.values()) == 3 * cfg.train.batch_size
    assert m["data_wait_sec"] >= 0 and 0 <= m["data_wait_share"] < 1 and np.isfinite(m["loss_total"])
    assert m["lr"] == m["lr_encoder"] == 0.05  # not rescaled; StepLR halves only after 5 epochs
    assert 0 < m["activation_memory_bytes"] < 2**30
    # the end-to-end model's own detections on the validation videos, scored every epoch (a sweep's metric)
    assert 0.0 <= m["val_average_mAP"] <= 1.0 and "val_mAP_tIoU_0.50" in m
    # run.keep_checkpoints=1: one checkpoint on disk, and it carries every epoch's metrics
    checkpoints = sorted((cfg.run.dir() / "ray" / "train").glob("epoch-*"))
    assert [c.name for c in checkpoints] == ["epoch-0001"]
    history = torch.load(checkpoints[0] / "state.pt", weights_only=True)["history"]
    assert [row["epoch"] for row in history] == [0, 1] and history[1]["loss_total"] == pytest.approx(m["loss_total"])
    # epoch 0 from global batch 0: slot 0 (S), S done -> T, slot 1 (T) done -> ST
    assert [row["level"] for row in history] == ["s_lofi+t_lofi+st_lofi", "t_lofi+st_lofi+s_lofi"]
    encoder = build_encoder(EncoderConfig(width=8, checkpoint=result.artifacts["encoder"], checkpoint_format="lofi"))
    model = torch.load(result.artifacts["model"], weights_only=True)
    assert all(torch.equal(v, model[f"encoder.{k}"]) for k, v in encoder.state_dict().items())
    info = json.loads(Path(result.artifacts["model_config"]).read_text())
    head = build_head(from_dict(type(cfg.head), info["head"]), encoder.feature_dim, info["head_snippets"],
                      info["num_classes"])
    head.load_state_dict({k[len("head."):]: v for k, v in model.items() if k.startswith("head.")})


def test_stage2_trains_the_encoder_but_keeps_its_batchnorm_statistics(one_worker, pretrained):
    _, result = one_worker
    before = torch.load(pretrained[1].artifacts["encoder"], weights_only=True)
    after = torch.load(result.artifacts["encoder"], weights_only=True)
    assert before.keys() == after.keys()
    convs = [k for k in before if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    moved = [k for k in convs if not torch.equal(before[k], after[k])]
    assert len(moved) == len(convs)  # end to end: every block's convolutions learnt from the TAL loss
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)  # train.freeze_encoder_bn


def test_train_is_tracked_per_epoch_in_mlflow(one_worker):
    from mlflow.tracking import MlflowClient

    cfg, result = one_worker
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "w1/train"
    for key in ("loss_total", "data_wait_share", "rows_read_t_lofi"):
        assert sorted(h.step for h in client.get_metric_history(run.info.run_id, key)) == [0, 1], key
    assert run.data.params["train.lr"] == "0.05"


def _compare(a: dict, b: dict, keys: tuple[str, ...], rtol: float) -> None:
    for key in keys:
        assert a[key] == pytest.approx(b[key], rel=rtol, abs=rtol), key


def _encoders_close(a: str, b: str, atol: float) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst <= atol, worst


def test_two_workers_at_the_same_global_batch_match_one_worker(one_worker, shards_dir, tmp_path):
    """Tolerance 1e-5: the same videos and per-video losses, but DDP averages two 3-video means
    where one worker averages six values, so float32 sums round differently (observed ~1e-7)."""
    from pipelines.stages.train import run

    cfg1, one = one_worker
    # cache_max_mib=0: the shards stream through Ray Data every epoch (the baseline's are read on the driver)
    cfg = make_cfg(shards_dir, tmp_path, "w2", f"encoder.checkpoint={cfg1.encoder.checkpoint}",
                   "scaling.num_workers=2", "data.cache_max_mib=0")
    two = run(cfg)
    assert two.metrics["global_batch"] == one.metrics["global_batch"] == 6  # per-worker batch 3, same steps
    # both workers switched levels at the same steps (else DDP would hang): each read half of every level
    assert all(two.metrics[f"rows_read_{level}"] == NUM_TRAIN_VIDEOS for level in GRIDS)
    assert two.metrics["level_num_snippets"] == one.metrics["level_num_snippets"]
    assert 0 <= two.metrics["data_wait_share_rank1"] <= two.metrics["data_wait_share"] < 1
    _compare(one.metrics, two.metrics, ("loss_total", "loss_boundary", "loss_iou_reg", "val_loss_total"), 1e-5)
    # each worker decodes its half of the validation videos; the gathered detections score like one worker's
    assert two.metrics["val_average_mAP"] == pytest.approx(one.metrics["val_average_mAP"], abs=1e-3)
    _encoders_close(one.artifacts["encoder"], two.artifacts["encoder"], atol=1e-5)


def _kill_when_paused(pid_file: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if pid_file.exists() and pid_file.read_text():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.2)


def test_a_killed_worker_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(
        one_worker, shards_dir, tmp_path, monkeypatch):
    """The baseline's config on one worker, killed (SIGKILL) at the start of epoch 1: the restarted
    worker group resumes after epoch 0 with the restored model and SGD momentum, the same level
    sequence (T, ST, S from global batch 3) and the same per-video loss sampling. Tolerance 1e-6:
    the same computation replayed."""
    from pipelines.stages.train import run

    cfg1, uninterrupted = one_worker
    pid_file, killed = tmp_path / "worker.pid", []
    monkeypatch.setenv("LOFI_TEST_PAUSE", f"1:{pid_file}")
    killer = threading.Thread(target=_kill_when_paused, args=(pid_file, killed), daemon=True)
    killer.start()
    cfg = make_cfg(shards_dir, tmp_path, "killed", f"encoder.checkpoint={cfg1.encoder.checkpoint}",
                   "run.max_failures=1")
    resumed = run(cfg)
    killer.join(timeout=5)
    assert killed, "the worker never paused at epoch 1"
    checkpoints = sorted(p.name for p in (cfg.run.dir() / "ray" / "train").glob("epoch-*"))
    assert checkpoints == ["epoch-0000", "epoch-0001"]
    assert resumed.metrics["global_batch"] == uninterrupted.metrics["global_batch"] == 6
    assert resumed.metrics["level_num_snippets"] == uninterrupted.metrics["level_num_snippets"] == 8
    _compare(uninterrupted.metrics, resumed.metrics,
             ("loss_total", "loss_boundary", "loss_iou_reg", "loss_classes", "val_loss_total"), 1e-6)
    _encoders_close(uninterrupted.artifacts["encoder"], resumed.artifacts["encoder"], atol=1e-6)
    # resuming the run under another fidelity schedule is refused in the worker, as one clear error
    with pytest.raises(LofiError, match="training worker 0: the checkpoint was trained with another fidelity"):
        run(make_cfg(shards_dir, tmp_path, "killed", f"encoder.checkpoint={cfg1.encoder.checkpoint}",
                     "fidelity.kind=s_lofi", "train.epochs=3"))


def test_train_reports_every_input_problem_at_once(shards_dir, tmp_path):
    from pipelines.stages.train import run

    cfg = make_cfg(shards_dir, tmp_path, "bad", "fidelity.kind=full", "fidelity.overrides.full.size_px=48",
                   "train.batch_size=7")
    with pytest.raises(LofiError) as info:
        run(cfg)
    text = str(info.value)
    assert "level 'full': size_px is 32 in the shards but 48 in the fidelity schedule" in text
    assert "split into chunks" in text and "max_row_mib" in text and "synth_00000" in text
    with pytest.raises(LofiError, match="fewer than train.batch_size=7"):
        run(make_cfg(shards_dir, tmp_path, "bad", "fidelity.kind=s_lofi", "train.batch_size=7"))
    # shards prepared without the T- and ST-LoFi levels
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    manifest["levels"] = [{**e, "shards": []} for e in manifest["levels"] if e["name"] == "s_lofi"]
    (tmp_path / "only_s").mkdir()
    (tmp_path / "only_s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LofiError) as info:
        run(make_cfg(tmp_path / "only_s", tmp_path, "bad"))
    assert "no level 't_lofi'" in str(info.value) and "no level 'st_lofi'" in str(info.value)


def write_features(run_dir: Path) -> None:
    """Feature shards as `lofi extract` writes them: 10 videos (8 training), T=8, D=8, classes a, b.

    Channel k marks the snippets of a class-k action, channels 2 and 3 its first and last
    snippet, on top of noise: a head can learn to localise them.
    """
    from pipelines.data.features import FeatureWriter

    rng = np.random.default_rng(0)
    writer = FeatureWriter(run_dir / "features", num_snippets=8, feature_dim=8)
    for i in range(10):
        first, last, k = 1 + i % 3, 4 + i % 3, i % 2  # snippets of 2 s: the action spans [2 first, 2 last + 2) s
        feats = rng.normal(0.0, 0.1, (8, 8)).astype(np.float32)
        feats[first:last + 1, k] += 1.0
        feats[first, 2] += 1.0
        feats[last, 3] += 1.0
        writer.add({"video_id": f"v{i:02d}", "subset": "validation" if i >= 8 else "training", "duration_sec": 16.0,
                    "num_snippets": 8, "segment_start_sec": [2.0 * first], "segment_end_sec": [2.0 * last + 2.0],
                    "segment_label": ["ab"[k]], "segment_label_id": [k]}, feats)
    writer.commit({"labels": ["a", "b"], "fixed_grid": True, "level": "fake"})


HEAD_SETS = ("head.name=gtad", "head.hidden=16", "head.cardinality=4", "head.num_gcnext=1",
             "head.num_align_samples=4", "data.val_subset=validation")


def test_train_head_learns_on_features_reports_map_and_resumes_by_name(shards_dir, tmp_path):
    from pipelines.stages.train_head import run

    cfg = make_cfg(shards_dir, tmp_path, "heads", *HEAD_SETS)
    write_features(cfg.run.dir())
    result = run(cfg)
    m = result.metrics
    assert m["epoch"] == 1 and m["global_batch"] == 4  # 8 training videos, batch 4, 2 epochs
    assert 0.0 <= m["val_average_mAP"] <= 1.0 and 0.0 <= m["val_mAP_0.50"] <= 1.0
    assert np.isfinite(m["val_loss_total"]) and m["loss_total"] > 0
    assert m["rows_read_train"] == 8 and 0 <= m["data_wait_share"] < 1
    assert Path(result.artifacts["model"]) == cfg.run.dir() / "head" / "model.pt"
    head = build_head(cfg.head, feature_dim=8, num_snippets=8, num_classes=2)
    head.load_state_dict(torch.load(result.artifacts["model"], weights_only=True))
    # the same run name with one more epoch continues after the last checkpoint
    first = cfg.run.dir() / "ray" / "train_head" / "epoch-0001" / "state.pt"
    stamp = first.stat().st_mtime_ns
    more = run(make_cfg(shards_dir, tmp_path, "heads", *HEAD_SETS, "train_head.epochs=3"))
    assert more.metrics["epoch"] == 2 and more.metrics["global_batch"] == 6
    assert first.stat().st_mtime_ns == stamp
    # run.keep_checkpoints (2): epoch 0's checkpoint made way for epoch 2's
    assert sorted(p.name for p in first.parent.parent.glob("epoch-*")) == ["epoch-0001", "epoch-0002"]
