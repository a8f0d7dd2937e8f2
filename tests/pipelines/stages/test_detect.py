"""`lofi detect`: a head over feature shards -> ActivityNet predictions (Soft-NMS, top-k) -> eval.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lofi.annotations import load_predictions
from lofi.config import from_dict, to_dict
from lofi.heads import build_head
from lofi.heads.common import decode_detections
from lofi_cli.commands import main as lofi_main
from pipelines.config import PipelineConfig
from pipelines.stages.detect import run
from pipelines.data.features import FeatureWriter

LABELS = ["jump", "run", "swim"]
T, D, TOP_K, SIGMA = 16, 8, 7, 0.5
HEAD = {"name": "bmn", "hidden": 16, "num_sample": 4, "num_sample_perbin": 1, "max_duration": 8}
# validation videos: (id, duration_sec, [(start, end, label)]); one training video that detect must skip
VIDEOS = [("v_a", 32.0, [(4.0, 12.0, "jump"), (20.0, 26.0, "run")]), ("v_b", 16.0, [(2.0, 9.0, "swim")]),
          ("v_c", 48.0, [(10.0, 30.0, "run")])]
TRAIN_VIDEO = ("v_train", 20.0, [(1.0, 5.0, "jump")])
# a test-server subset: videos without ground truth (ActivityNet's "testing")
TEST_VIDEOS = [("v_t1", 24.0, []), ("v_t2", 40.0, [])]


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[PipelineConfig, Path]:
    """A run folder holding features (random, fixed grid), a head (random init) and ground truth."""
    rng = np.random.default_rng(0)
    database = {}
    writer = FeatureWriter(tmp_path / "runs" / "r" / "features", T, D)
    for (vid, dur, segs), subset in ([(v, "validation") for v in VIDEOS] + [(TRAIN_VIDEO, "training")]
                                     + [(v, "testing") for v in TEST_VIDEOS]):
        database[vid] = {"subset": subset, "duration": dur,
                         "annotations": [{"segment": [s, e], "label": lab} for s, e, lab in segs]}
        writer.add({"video_id": vid, "subset": subset, "duration_sec": dur, "num_snippets": T,
                    "segment_start_sec": [s for s, _, _ in segs], "segment_end_sec": [e for _, e, _ in segs],
                    "segment_label": [lab for _, _, lab in segs],
                    "segment_label_id": [LABELS.index(lab) for _, _, lab in segs]},
                   rng.standard_normal((T, D)).astype(np.float32))
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"version": "VERSION 1.3", "database": database}))
    writer.commit({"level": "full", "fixed_grid": True, "labels": LABELS, "annotations": str(gt),
                   "encoder": {"checkpoint": "enc.pt"}})
    cfg = from_dict(PipelineConfig, {"run": {"name": "r", "storage": str(tmp_path / "runs")}, "head": HEAD,
                                     "detect": {"top_k": TOP_K, "soft_nms_sigma": SIGMA},
                                     "tracking": {"enabled": False}})
    torch.manual_seed(0)
    head = build_head(cfg.head, D, T, len(LABELS))
    (tmp_path / "runs" / "r" / "head").mkdir()
    torch.save(head.state_dict(), tmp_path / "runs" / "r" / "head" / "model.pt")
    return cfg, gt


def reference_soft_nms(segments: np.ndarray, scores: np.ndarray, labels: np.ndarray, top_k: int, sigma: float):
    """Class-aware Gaussian Soft-NMS written out plainly, one pick at a time."""
    scores, alive, kept = scores.astype(float).copy(), list(range(len(scores))), []
    while alive and len(kept) < top_k:
        best = max(alive, key=lambda i: (scores[i], -i))
        kept.append((best, scores[best]))
        alive.remove(best)
        for i in alive:
            if labels[i] != labels[best]:
                continue
            inter = max(0.0, min(segments[i, 1], segments[best, 1]) - max(segments[i, 0], segments[best, 0]))
            union = (segments[i, 1] - segments[i, 0]) + (segments[best, 1] - segments[best, 0]) - inter
            iou = inter / union if union > 0 else 0.0
            if iou > 0:
                scores[i] *= np.exp(-iou * iou / sigma)
    return kept


def test_predictions_are_activitynet_json_with_top_k_after_soft_nms(run_dir):
    cfg, _ = run_dir
    result = run(cfg, verbose=False)
    payload = json.loads(Path(result.artifacts["predictions"]).read_text())
    assert payload["version"] == "VERSION 1.3" and set(payload) == {"version", "external_data", "results"}
    assert sorted(payload["results"]) == sorted(v[0] for v in VIDEOS)  # the validation subset only
    det = load_predictions(result.artifacts["predictions"])  # the reader the evaluator uses accepts it
    assert set(det.label) <= set(LABELS)
    # the head's raw candidates, decoded independently of the stage, then Soft-NMS'd by the reference above
    from pipelines.data.features import read_features, video_features

    feats = video_features(read_features(cfg.run.dir() / "features", "validation"))
    head = build_head(cfg.head, D, T, len(LABELS))
    head.load_state_dict(torch.load(cfg.run.dir() / "head" / "model.pt"))
    head.eval()
    for vid, dur, _ in VIDEOS:
        entries = payload["results"][vid]
        assert len(entries) == TOP_K  # far more candidates than TOP_K: exactly top_k kept
        assert all(0.0 <= e["segment"][0] <= e["segment"][1] <= dur for e in entries)
        with torch.no_grad():
            out = head(torch.tensor(feats[vid]).T[None])  # (T, D) -> (1, D, T)
        raw = decode_detections(out, [dur], cfg.head.top_k_classes)[0]
        kept = reference_soft_nms(raw["segments_sec"], raw["scores"], raw["label_ids"], TOP_K, SIGMA)
        assert [e["label"] for e in entries] == [LABELS[raw["label_ids"][i]] for i, _ in kept]
        np.testing.assert_allclose([e["score"] for e in entries], [s for _, s in kept], rtol=1e-5)  # float32: batch of 3 vs 1
        np.testing.assert_allclose([e["segment"] for e in entries], np.clip(raw["segments_sec"][[i for i, _ in kept]], 0, dur))
        # Soft-NMS changed something: plain top-k by raw score would keep other scores
        assert not np.allclose([e["score"] for e in entries], np.sort(raw["scores"])[::-1][:TOP_K])


def test_eval_json_is_what_lofi_eval_prints_for_the_predictions(run_dir, capsys):
    cfg, gt = run_dir
    result = run(cfg, verbose=False)
    saved = json.loads(Path(result.artifacts["eval"]).read_text())
    capsys.readouterr()
    assert lofi_main(["eval", "--ground-truth", str(gt), "--predictions", result.artifacts["predictions"],
                      "--subset", "validation", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == saved
    assert saved["tiou_thresholds"] == pytest.approx([0.5 + 0.05 * i for i in range(10)])
    assert len(saved["mAP"]) == 10 and 0.0 <= saved["average_mAP"] <= 1.0
    assert saved["num_videos"] == 3 and saved["num_ground_truth"] == 4
    assert result.metrics["average_mAP"] == saved["average_mAP"]


def test_a_subset_without_ground_truth_gives_a_submission_file_and_no_score(run_dir, capsys):
    """ActivityNet's test server: detect on the testing subset, whose videos carry no segments."""
    cfg, gt = run_dir
    gt.unlink()  # no ground truth is needed to detect on a subset that has none
    config = gt.parent / "detect.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert lofi_main(["detect", "--config", str(config), "--set", "detect.subset=testing"]) == 0
    out = capsys.readouterr().out
    assert "2 testing videos" in out and "no ground truth in this subset: not scored" in out
    folder = cfg.run.dir() / "detect" / "testing"
    assert sorted(p.name for p in folder.iterdir()) == ["predictions.json"]  # no eval.json
    payload = json.loads((folder / "predictions.json").read_text())
    assert set(payload) == {"version", "external_data", "results"} and payload["version"] == "VERSION 1.3"
    assert sorted(payload["results"]) == ["v_t1", "v_t2"]
    assert all(len(entries) == TOP_K for entries in payload["results"].values())
    # the features manifest records no encoder origin (written before origins existed): declared used
    assert payload["external_data"]["used"] is True and "unknown" in payload["external_data"]["details"]
    assert not (cfg.run.dir() / "detect" / "predictions.json").exists()  # the validation outputs are elsewhere


def test_missing_head_is_one_clear_error(run_dir, capsys):
    cfg, _ = run_dir
    (cfg.run.dir() / "head" / "model.pt").unlink()
    argv = ["detect", "--set", f"run.storage={cfg.run.storage}", "--set", "run.name=r", "--set", "tracking.enabled=false"]
    assert lofi_main(argv) == 2
    err = capsys.readouterr().err
    assert "head/model.pt does not exist: run `lofi train-head`" in err and "Traceback" not in err


def test_in_memory_scoring_of_validation_detections_matches_hand_worked_cases():
    """Stage 2 scores its validation detections without files: exact hits score 1, a wrong class
    scores 0, and half the ground truth found (at every tIoU) scores 0.5."""
    from pipelines.data.batches import VideoLabel
    from lofi.evaluation import score_in_memory

    videos = [VideoLabel("a", "validation", 30.0, ((2.0, 8.0), (20.0, 26.0)), (0, 1), ("jump", "spin")),
              VideoLabel("b", "validation", 20.0, ((5.0, 9.0),), (0,), ("jump",))]
    labels = ["jump", "spin"]

    def entry(start: float, end: float, label: str, score: float = 0.9) -> dict:
        return {"segment": [start, end], "label": label, "score": score}

    exact = {"a": [entry(2, 8, "jump"), entry(20, 26, "spin")], "b": [entry(5, 9, "jump")]}
    assert score_in_memory(videos, labels, exact, "anet")["average_mAP"] == pytest.approx(1.0)
    swapped = {"a": [entry(2, 8, "spin"), entry(20, 26, "jump")], "b": [entry(5, 9, "spin")]}
    assert score_in_memory(videos, labels, swapped, "anet")["average_mAP"] == pytest.approx(0.0)
    # jump: 1 of 2 found with precision 1 -> AP 0.5; spin: found -> 1; mAP (0.5 + 1) / 2
    partial = {"a": [entry(2, 8, "jump"), entry(20, 26, "spin")], "b": []}
    result = score_in_memory(videos, labels, partial, "thumos")
    assert result["mAP"] == pytest.approx([0.75] * 5) and result["average_mAP"] == pytest.approx(0.75)


# Fixed-stride features (THUMOS14's way): 2 s snippets, the head on windows of 8 snippets, 4 apart.
STRIDE_SEC, WINDOW = 2.0, 8
# (id, duration_sec, window starts worked by hand): T = ceil(duration / 2 s)
STRIDE_VIDEOS = [("s_long", 50.0, [0, 4, 8, 12, 16, 17]),  # T = 25: the last window ends at snippet 25
                 ("s_mid", 32.0, [0, 4, 8]),  # T = 16
                 ("s_short", 9.0, [0])]  # T = 5 < 8: one window, 3 snippets of padding, 7 s past the video


@pytest.fixture
def stride_run(tmp_path: Path) -> PipelineConfig:
    """A run folder with fixed-stride features (zero-padded rows, as `lofi extract` writes them) and a
    head built for windows of WINDOW snippets."""
    rng = np.random.default_rng(1)
    lengths = {vid: int(np.ceil(dur / STRIDE_SEC)) for vid, dur, _ in STRIDE_VIDEOS}
    writer = FeatureWriter(tmp_path / "runs" / "r" / "features", max(lengths.values()), D)
    database = {}
    for vid, dur, _ in STRIDE_VIDEOS:
        database[vid] = {"subset": "validation", "duration": dur,
                         "annotations": [{"segment": [1.0, 5.0], "label": "jump"}]}
        writer.add({"video_id": vid, "subset": "validation", "duration_sec": dur, "num_snippets": lengths[vid],
                    "segment_start_sec": [1.0], "segment_end_sec": [5.0], "segment_label": ["jump"],
                    "segment_label_id": [0]}, rng.standard_normal((lengths[vid], D)).astype(np.float32))
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"version": "VERSION 1.3", "database": database}))
    writer.commit({"level": "stride", "fixed_grid": False, "labels": LABELS, "annotations": str(gt),
                   "level_config": {"num_snippets": None, "snippet_stride_sec": STRIDE_SEC}, "encoder": {"checkpoint": ""}})
    cfg = from_dict(PipelineConfig, {"run": {"name": "r", "storage": str(tmp_path / "runs")}, "head": HEAD,
                                     "data": {"window_snippets": WINDOW, "window_overlap": 0.5},
                                     "detect": {"top_k": TOP_K, "soft_nms_sigma": SIGMA, "protocol": "thumos"},
                                     "tracking": {"enabled": False}})
    torch.manual_seed(1)
    (tmp_path / "runs" / "r" / "head").mkdir()
    torch.save(build_head(cfg.head, D, WINDOW, len(LABELS)).state_dict(), tmp_path / "runs" / "r" / "head" / "model.pt")
    return cfg


def test_fixed_stride_features_are_detected_window_by_window_and_merged(stride_run):
    cfg = stride_run
    result = run(cfg, verbose=False)
    results = json.loads(Path(result.artifacts["predictions"]).read_text())["results"]
    saved = json.loads(Path(result.artifacts["eval"]).read_text())
    assert saved["tiou_thresholds"] == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])
    from pipelines.data.features import read_features, video_features

    feats = video_features(read_features(cfg.run.dir() / "features", "validation"))
    head = build_head(cfg.head, D, WINDOW, len(LABELS))
    head.load_state_dict(torch.load(cfg.run.dir() / "head" / "model.pt"))
    head.eval()
    for vid, dur, starts in STRIDE_VIDEOS:
        # the reference: each hand-listed window run alone, shifted, its padding's detections dropped, one Soft-NMS
        segments, scores, labels = [], [], []
        for start in starts:
            window = np.zeros((WINDOW, D), dtype=np.float32)
            part = feats[vid][start:start + WINDOW]
            window[:len(part)] = part
            with torch.no_grad():
                out = head(torch.tensor(window).T[None])  # (W, D) -> (1, D, W)
            raw = decode_detections(out, [WINDOW * STRIDE_SEC], cfg.head.top_k_classes)[0]
            seg = raw["segments_sec"] + start * STRIDE_SEC
            end = min((start + WINDOW) * STRIDE_SEC, dur)
            keep = (seg[:, 0] + seg[:, 1]) / 2 < end
            segments.append(np.clip(seg[keep], start * STRIDE_SEC, end))
            scores.append(raw["scores"][keep])
            labels.append(raw["label_ids"][keep])
        segments, scores, labels = np.concatenate(segments), np.concatenate(scores), np.concatenate(labels)
        kept = reference_soft_nms(segments, scores, labels, TOP_K, SIGMA)
        entries = results[vid]
        assert [e["label"] for e in entries] == [LABELS[labels[i]] for i, _ in kept]
        np.testing.assert_allclose([e["score"] for e in entries], [s for _, s in kept], rtol=1e-5)
        np.testing.assert_allclose([e["segment"] for e in entries], segments[[i for i, _ in kept]], rtol=1e-6)
        assert all(0.0 <= e["segment"][0] < e["segment"][1] <= dur for e in entries)
    assert max(e["segment"][1] for e in results["s_long"]) > WINDOW * STRIDE_SEC  # later windows were detected


def test_fixed_stride_features_without_windows_are_one_clear_error(stride_run, capsys):
    cfg = stride_run
    argv = ["detect", "--set", f"run.storage={cfg.run.storage}", "--set", "run.name=r", "--set", "tracking.enabled=false",
            "--set", "data.window_snippets=0"]
    assert lofi_main(argv) == 2
    err = capsys.readouterr().err
    assert "fixed stride" in err and "set data.window_snippets" in err and "Traceback" not in err
