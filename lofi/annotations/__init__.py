"""Temporal action annotations: ActivityNet v1.3 / HACS JSON, THUMOS14 CSV and JSON, predictions.

Everything is read into one typed form (`AnnotationSet` of `Video`s with `Segment`s in
seconds, and a `LabelVocab` whose class ids are the positions of the sorted class names)
and validated with every problem reported at once; see `load.py` for the rules and the
end-of-video tolerance. Predictions are columnar (`Detections`) for fast evaluation.
"""

from lofi.annotations.load import (
    END_TOLERANCE_FRACTION,
    END_TOLERANCE_SEC,
    FORMATS,
    end_tolerance_sec,
    load_annotations,
    quiet_annotation_log,
    save_activitynet,
)
from lofi.annotations.predictions import detections_from_results, load_predictions, save_predictions
from lofi.annotations.types import (
    SUBSET_ALIASES,
    SUBSETS,
    AnnotationError,
    AnnotationSet,
    Detections,
    LabelVocab,
    Segment,
    Video,
)

__all__ = [
    "END_TOLERANCE_FRACTION", "END_TOLERANCE_SEC", "FORMATS", "SUBSETS", "SUBSET_ALIASES",
    "AnnotationError", "AnnotationSet", "Detections", "LabelVocab", "Segment", "Video",
    "detections_from_results", "end_tolerance_sec", "load_annotations", "load_predictions", "quiet_annotation_log", "save_activitynet",
    "save_predictions",
]
