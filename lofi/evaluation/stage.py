"""The evaluation stage: files in, one JSON-ready result out (`lofi eval` and pipelines call it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from lofi.annotations import AnnotationSet, load_annotations, load_predictions
from lofi.errors import LofiError
from lofi.evaluation.common import read_blocked, tiou_thresholds
from lofi.evaluation.detection import evaluate_detection
from lofi.evaluation.proposals import evaluate_proposals
from lofi.splits import relabel


@dataclass(frozen=True)
class EvalConfig:
    ground_truth: str = ""  # ActivityNet JSON, THUMOS CSV, or prediction-format GT (+ metadata)
    predictions: str = ""  # ActivityNet-format predictions (or proposals) JSON
    subset: str = "validation"
    protocol: Literal["anet", "thumos"] = "anet"  # anet: 0.50:0.05:0.95; thumos: 0.3:0.1:0.7
    tiou: tuple[float, ...] = ()  # explicit thresholds; win over the protocol when given
    blocked: str = ""  # file of video ids left out of ground truth and predictions
    metadata: str = ""  # CSV with filename, video-duration (and fps) per video
    labels: str = ""  # known class names (JSON list or one per line); optional
    proposals: bool = False  # AR@AN instead of mAP
    max_avg_proposals: float = 100.0
    skip_invalid: bool = False  # drop bad ground-truth / prediction entries instead of failing
    # the tuning split (lofi.splits): a file of the video ids moved to subset "tuning" (a JSON list or one per
    # line), or the manifest.json of `lofi prepare` shards written with a tuning split (its tuning.video_ids)
    tuning_videos: str = ""

    def thresholds(self) -> list[float]:
        return tiou_thresholds(self.protocol, self.tiou or None).tolist()


def read_tuning_videos(path: str) -> frozenset[str]:
    """The tuning split's video ids: an id file, or a shard manifest's `tuning.video_ids`."""
    if not Path(path).is_file():
        raise LofiError(f"tuning_videos: {path} does not exist; pass the shards' manifest.json or a file of video ids")
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        manifest = json.loads(text)
        if not isinstance(manifest.get("tuning"), dict):
            raise LofiError(f"{path}: no tuning split in this manifest (prepare.tuning_fraction was 0); "
                            "pass a file of video ids, or prepare the shards with a tuning split")
        return frozenset(manifest["tuning"]["video_ids"])
    return read_blocked(path)


def load_ground_truth(cfg: EvalConfig, tuning_ids: Iterable[str] = ()) -> AnnotationSet:
    """Ground truth as the official evaluator reads it: suspect segments kept (lenient)."""
    if not cfg.ground_truth or not cfg.predictions:
        raise LofiError("both the ground truth and the predictions are needed: "
                        "pass --ground-truth FILE --predictions FILE")
    ann = load_annotations(cfg.ground_truth, metadata=cfg.metadata or None, skip_invalid=cfg.skip_invalid,
                           labels=cfg.labels or None, lenient=True)
    tuning = set(tuning_ids) | (read_tuning_videos(cfg.tuning_videos) if cfg.tuning_videos else set())
    ann = relabel(ann, tuning)
    selected = ann.subset(cfg.subset)
    if not len(selected):
        counts = ", ".join(f"{k}: {v}" for k, v in ann.subset_counts().items())
        raise LofiError(f"{cfg.ground_truth}: no videos in subset {cfg.subset!r} ({counts}); choose another --subset")
    return selected


def run_eval(cfg: EvalConfig, tuning_ids: Iterable[str] = ()) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(result as a JSON-ready dict, warnings about the inputs) for detections or proposals;
    `tuning_ids`: videos of the tuning split (as `tuning_videos` names them in a file)."""
    gt = load_ground_truth(cfg, tuning_ids)
    det = load_predictions(cfg.predictions, skip_invalid=cfg.skip_invalid)
    blocked = read_blocked(cfg.blocked) if cfg.blocked else frozenset()
    thresholds = cfg.thresholds()
    if cfg.proposals:
        result = evaluate_proposals(gt, det, thresholds, cfg.max_avg_proposals, blocked).to_json()
    else:
        result = evaluate_detection(gt, det, thresholds, blocked).to_json()
    result["subset"] = cfg.subset
    warnings = list(gt.warnings)
    if result.get("unknown_labels"):
        total = sum(result["unknown_labels"].values())
        warnings.append(f"{cfg.predictions}: {total} prediction(s) with {len(result['unknown_labels'])} label(s) "
                        f"absent from the {cfg.subset} ground truth were not scored: "
                        + ", ".join(f"{k!r} ({v})" for k, v in result["unknown_labels"].items()))
    if result.get("num_predictions_outside_videos"):
        warnings.append(f"{cfg.predictions}: {result['num_predictions_outside_videos']} prediction(s) on videos "
                        f"outside the {cfg.subset} ground truth count as false positives, as in the official evaluator")
    return result, tuple(warnings)


def score_in_memory(videos: Iterable[Any], labels: list[str], results: dict[str, list[dict[str, Any]]],
                    protocol: str) -> dict[str, Any]:
    """mAP of in-memory detections against in-memory ground truth: `videos` carry `video_id`,
    `subset`, `duration_sec`, `segments_sec` and `labels` (e.g. pipelines' VideoLabel rows), as
    stage 2's validation pass has them; the same scoring as `lofi eval`."""
    from lofi.annotations import LabelVocab, Segment, Video, detections_from_results
    from lofi.evaluation.common import PROTOCOLS

    gt = AnnotationSet(tuple(Video(v.video_id, v.subset, v.duration_sec, segments=tuple(
        Segment(s, e, name) for (s, e), name in zip(v.segments_sec, v.labels))) for v in videos),
        LabelVocab.from_names(labels))
    return evaluate_detection(gt, detections_from_results(results), PROTOCOLS[protocol]).to_json()
