"""Evaluation of temporal action detection (mAP at tIoU thresholds) and proposals (AR@AN).

Both reproduce the official ActivityNet evaluators (Evaluation/eval_detection.py and
eval_proposal.py), vectorised with numpy; `lofi eval` is the command-line front end.
"""

from lofi.evaluation.common import PROTOCOLS, read_blocked, segment_tiou, tiou_thresholds
from lofi.evaluation.detection import DetectionResult, evaluate_detection, greedy_match, interpolated_ap
from lofi.evaluation.proposals import AR_AT, ProposalResult, evaluate_proposals
from lofi.evaluation.stage import EvalConfig, load_ground_truth, run_eval, score_in_memory

__all__ = [
    "AR_AT", "PROTOCOLS", "DetectionResult", "EvalConfig", "ProposalResult", "evaluate_detection",
    "evaluate_proposals", "greedy_match", "interpolated_ap", "load_ground_truth", "read_blocked", "run_eval", "score_in_memory",
    "segment_tiou", "tiou_thresholds",
]
