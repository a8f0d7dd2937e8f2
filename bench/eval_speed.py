"""`lofi eval` end to end at ActivityNet-1.3 validation size, side by side with a plain reference.

Ground truth: the real validation set (4,926 videos, 7,654 segments, from
/work/shared/data/activitynet, read as `lofi eval` reads it, with the metadata CSV).
Predictions: 100 per video (492,600), seeded: perturbed copies of the video's ground-truth
segments (sometimes with a wrong label) plus random segments with random labels, written to
a temporary ActivityNet-format JSON file.

Two programs run as fresh processes, alternating, `--rounds` times each:
- `lofi eval --json` (the CLI as a user starts it: interpreter, imports, both files, scoring);
- the plain reference: this file with `--plain-reference`, i.e. stdlib `json.load` of both
  files, one Python row loop into lists, and the official algorithm step by step
  (bench/reference/naive_eval.py). Its own report splits its time into start-up + imports,
  reading the inputs, and scoring, so "lofi eval / reading alone" is printed too.
Printed: wall and CPU seconds of every run, the ratios (lofi eval / reference, best of each),
each program's phases, and the largest AP difference between the two (the same numbers).
CPU seconds are the children's user + system time: the machine is shared, and CPU time is
the less disturbed measure; wall time is printed beside it.

    .venv/bin/python bench/eval_speed.py [--rounds N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Only the stdlib, numpy and the reference at module level: the plain-reference process
# must not pay (or be helped by) lofi's imports. lofi is imported inside the functions.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference.naive_eval import detection_ap  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "activitynet"
GT_FILE, META_FILE = DATA / "sample_detection_prediction.json", DATA / "activitynet_v1-3_valid_metadata.csv"
PER_VIDEO = 100


def make_predictions(gt, per_video: int, seed: int):
    """`per_video` scored segments per video: ~60% jittered ground truth, the rest random."""
    from lofi.annotations import Detections

    rng = np.random.default_rng(seed)
    labels = np.array(gt.labels.names, dtype=object)
    vids, starts, ends, names = [], [], [], []
    for video in gt.videos:
        num_near = int(per_video * 0.6) if video.segments else 0
        src = rng.integers(0, max(len(video.segments), 1), num_near)
        seg = np.array([[s.start_sec, s.end_sec] for s in video.segments]).reshape(-1, 2)
        center, length = seg[src].mean(axis=1), np.maximum(seg[src, 1] - seg[src, 0], 0.1)
        # Jitter of the centre and the length, in units of the segment length.
        center = center + rng.normal(0, 0.15, num_near) * length
        length = length * np.exp(rng.normal(0, 0.25, num_near))
        near_label = np.array([video.segments[i].label for i in src], dtype=object)
        wrong = rng.random(num_near) < 0.2
        near_label[wrong] = rng.choice(labels, int(wrong.sum()))
        num_random = per_video - num_near
        r_start = rng.uniform(0, video.duration_sec, num_random)
        r_end = np.minimum(r_start + rng.uniform(0.5, video.duration_sec, num_random), video.duration_sec)
        vids += [video.video_id] * per_video
        starts.append(np.concatenate([np.clip(center - length / 2, 0, None), r_start]))
        ends.append(np.concatenate([np.minimum(center + length / 2, video.duration_sec), r_end]))
        names.append(np.concatenate([near_label, rng.choice(labels, num_random)]))
    start, end = np.concatenate(starts), np.concatenate(ends)
    end = np.maximum(end, start)
    # Coarse scores (3 decimals) so that ties occur, as with real detector outputs.
    score = np.round(rng.random(len(start)), 3)
    return Detections(np.array(vids, dtype=object), start, end, score, np.concatenate(names))


def plain_reference(gt_path: str, pred_path: str) -> int:
    """The reference process: prints its phases and per-class AP as one JSON object."""
    startup_cpu = time.process_time()  # interpreter start-up and this file's imports (numpy)
    started = time.perf_counter()
    with open(gt_path) as f:
        gt_rows = [(video, float(s["segment"][0]), float(s["segment"][1]), s["label"])
                   for video, segs in json.load(f)["results"].items() for s in segs]
    with open(pred_path) as f:
        results = json.load(f)["results"]
    pred_rows = []
    for video, entries in results.items():
        for e in entries:
            pred_rows.append((video, float(e["segment"][0]), float(e["segment"][1]), e.get("label", ""),
                              float(e["score"])))
    del results
    read_cpu, read_wall = time.process_time() - startup_cpu, time.perf_counter() - started
    thresholds = np.linspace(0.5, 0.95, 10).tolist()  # the official ActivityNet thresholds
    per_class = detection_ap(gt_rows, pred_rows, thresholds)
    print(json.dumps({"startup_cpu": startup_cpu, "read_cpu": read_cpu, "read_wall": read_wall,
                      "score_cpu": time.process_time() - startup_cpu - read_cpu, "per_class_ap": per_class}))
    return 0


def timed_child(argv: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s, stdout) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def lofi_phases(pred_path: Path, rounds: int) -> dict[str, float]:
    """Best CPU seconds of each phase of `lofi eval`, timed in this process (imports: a fresh one)."""
    from lofi.annotations import load_predictions
    from lofi.evaluation import detection, tiou_thresholds
    from lofi.evaluation.common import GroundTruthColumns, isin
    from lofi.evaluation.stage import EvalConfig, load_ground_truth

    cfg = EvalConfig(ground_truth=str(GT_FILE), metadata=str(META_FILE), predictions=str(pred_path))
    code = "import time, lofi_cli.eval; print(time.process_time())"
    best: dict[str, float] = {}
    for _ in range(rounds):
        phases = {"interpreter + imports": float(timed_child([sys.executable, "-c", code])[2])}
        clock = time.process_time()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.process_time()
            phases[name], clock = now - clock, now

        gt = load_ground_truth(cfg)
        lap("annotation load")
        det = load_predictions(pred_path)
        lap("predictions load")
        columns, thresholds = GroundTruthColumns.build(gt), tiou_thresholds(tiou=cfg.thresholds())
        grouped = detection.group(columns, det, gt.labels)
        lap("grouping")
        tp = detection.match(grouped, columns, det, thresholds)
        lap("matching")
        detection.class_ap(grouped, tp)
        int((~isin(det.video_id, columns.video_ids)).sum())
        lap("AP + counts")
        best = {k: min(v, best.get(k, v)) for k, v in phases.items()}
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="runs of each program, alternating (default 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from lofi.annotations import load_annotations, save_predictions

    # The real file's 6 zero-length / past-the-end segments are known; kept as the official evaluator does.
    logging.getLogger("lofi.annotations").setLevel(logging.ERROR)
    gt = load_annotations(GT_FILE, metadata=META_FILE, lenient=True)
    det = make_predictions(gt, PER_VIDEO, args.seed)
    print(f"ground truth: {len(gt)} videos, {gt.num_segments} segments, {len(gt.labels)} labels; "
          f"predictions: {len(det)} ({PER_VIDEO} per video, seed {args.seed}); tIoU 0.50:0.05:0.95")
    with tempfile.TemporaryDirectory() as tmp:
        pred_path = Path(tmp) / "pred.json"
        save_predictions(det, pred_path)
        print(f"predictions file: {pred_path.stat().st_size / 1e6:.1f} MB")
        lofi_argv = [sys.executable, "-m", "lofi_cli", "eval", "--ground-truth", str(GT_FILE),
                     "--metadata", str(META_FILE), "--predictions", str(pred_path), "--json"]
        ref_argv = [sys.executable, str(Path(__file__).resolve()), "--plain-reference", str(GT_FILE), str(pred_path)]
        runs: dict[str, list[tuple[float, float]]] = {"lofi": [], "ref": []}
        print(f"{'round':<6} {'lofi eval wall / CPU s':>24} {'reference wall / CPU s':>24} {'ratio wall / CPU':>18}")
        for r in range(args.rounds):
            lofi_wall, lofi_cpu, lofi_out = timed_child(lofi_argv)
            ref_wall, ref_cpu, ref_out = timed_child(ref_argv)
            runs["lofi"].append((lofi_wall, lofi_cpu))
            runs["ref"].append((ref_wall, ref_cpu))
            print(f"{r + 1:<6} {lofi_wall:>13.2f} / {lofi_cpu:<8.2f} {ref_wall:>13.2f} / {ref_cpu:<8.2f} "
                  f"{lofi_wall / ref_wall:>8.2f} / {lofi_cpu / ref_cpu:.2f}")
        phases = lofi_phases(pred_path, args.rounds)
    report(runs, json.loads(lofi_out), json.loads(ref_out), phases)
    return 0


def report(runs: dict[str, list[tuple[float, float]]], lofi_result: dict, ref: dict, phases: dict[str, float]) -> None:
    (lw, lc), (rw, rc) = (tuple(min(x) for x in zip(*runs[k])) for k in ("lofi", "ref"))
    print(f"best of each: lofi eval {lw:.2f} s wall / {lc:.2f} s CPU; reference {rw:.2f} s wall / {rc:.2f} s CPU")
    print(f"RATIO lofi eval / plain reference: {lw / rw:.2f}x wall, {lc / rc:.2f}x CPU (goal: at most 0.5x)")
    read = ref["startup_cpu"] + ref["read_cpu"]
    print(f"      lofi eval / the reference's start-up + reading alone (no scoring): {lc / read:.2f}x CPU")
    print("lofi eval phases (CPU s, best of the rounds): "
          + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()) + f"; sum {sum(phases.values()):.2f}")
    print(f"reference phases (CPU s, last round): start-up + imports {ref['startup_cpu']:.3f}, "
          f"reading both files {ref['read_cpu']:.3f} ({ref['read_wall']:.2f} s wall), scoring {ref['score_cpu']:.3f}")
    names = sorted(ref["per_class_ap"])
    assert sorted(lofi_result["per_class_ap"]) == names, "class lists differ"
    ours = np.array([lofi_result["per_class_ap"][k] for k in names])
    diff = float(np.abs(ours - np.array([ref["per_class_ap"][k] for k in names])).max())
    print(f"average mAP: lofi eval {lofi_result['average_mAP']:.6f}, reference "
          f"{np.mean([ref['per_class_ap'][k] for k in names]):.6f}; max |AP difference| over classes and "
          f"thresholds: {diff:.3g}; same result: {diff < 1e-9}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plain-reference"]:
        sys.exit(plain_reference(*sys.argv[2:4]))
    sys.exit(main())
