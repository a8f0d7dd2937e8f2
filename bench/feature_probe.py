"""Linear probes on extracted features: can each action's snippets be told from background ones?

For every branch of a finished `lofi demo` (or `lofi pipeline`) run, the snippets of the
full-fidelity features are labelled by the segment their centre lies in (background outside
every segment). For each class a logistic regression (L2, class-balanced, fit by L-BFGS on the
standardised features of the training videos) separates that class's snippets from background
snippets; its balanced accuracy on the validation videos' snippets is printed per branch. A
class whose frozen features probe near chance is one stage 1 never learnt to tell from
"nothing happens": the task discrepancy a TAL head cannot repair and end-to-end training can.

    .venv/bin/python bench/feature_probe.py demo_out/runs/demo            # every branch found
    .venv/bin/python bench/feature_probe.py demo_out/runs/demo --branches baseline lofi
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pipelines.data.features import features_array, read_features

BACKGROUND = "background"


def snippets(table, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D), label per snippet) of one subset's videos."""
    arrays = features_array(table)  # (V, T, D)
    meta = table.select(["subset", "num_snippets", "duration_sec", "segment_start_sec", "segment_end_sec",
                         "segment_label"]).to_pylist()
    feats, labels = [], []
    for x, row in zip(arrays, meta):
        if row["subset"] != subset:
            continue
        t = row["num_snippets"]
        step = row["duration_sec"] / t
        for i in range(t):
            centre = (i + 0.5) * step
            inside = [lb for s, e, lb in zip(row["segment_start_sec"], row["segment_end_sec"], row["segment_label"])
                      if s <= centre <= e]
            feats.append(x[i])
            labels.append(inside[0] if inside else BACKGROUND)
    return np.stack(feats).astype(np.float32), np.array(labels)


def probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> float:
    """Balanced accuracy on (x_val, y_val) of a class-balanced L2 logistic regression fit on the training set."""
    x = torch.from_numpy(x_train)
    y = torch.from_numpy(y_train.astype(np.float32))
    pos = float(y.mean())
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, weight=weight) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        predicted = ((torch.from_numpy(x_val) @ w + b) > 0).numpy()
    return 0.5 * (predicted[y_val].mean() + (~predicted[~y_val]).mean())


def branch_probes(features_dir: Path, train: str, val: str) -> dict[str, float]:
    table = read_features(str(features_dir))
    x_train, y_train = snippets(table, train)
    x_val, y_val = snippets(table, val)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    out = {}
    for label in sorted(set(y_train) - {BACKGROUND}):
        keep, keep_val = np.isin(y_train, [label, BACKGROUND]), np.isin(y_val, [label, BACKGROUND])
        if (y_val[keep_val] == label).any():
            out[label] = probe(x_train[keep], y_train[keep] == label, x_val[keep_val], y_val[keep_val] == label)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Per class, a linear probe of action vs background snippets on "
                                                 "each branch's full-fidelity features (balanced accuracy).")
    parser.add_argument("run", nargs="?", default="demo_out/runs/demo",
                        help="a pipeline run folder holding <branch>/features/ (default: %(default)s, `make demo`'s)")
    parser.add_argument("--branches", nargs="*", help="branches to probe (default: every one with features)")
    parser.add_argument("--train-subset", default="training", help="subset the probes are fit on (default: %(default)s)")
    parser.add_argument("--val-subset", default="validation", help="subset they are scored on (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    run = Path(args.run)
    branches = args.branches or sorted(p.parent.parent.name for p in run.glob("*/features/features_manifest.json"))
    if not branches:
        print(f"feature_probe: no <branch>/features/ under {run} (run `make demo` first, or name a run folder)",
              file=sys.stderr)
        return 2
    results = {b: branch_probes(run / b / "features", args.train_subset, args.val_subset) for b in branches}
    labels = sorted({label for r in results.values() for label in r})
    print(f"linear probe, action vs background snippets: balanced accuracy on {args.val_subset} (chance 0.5)")
    print(f"{'':<18}" + "".join(f"{label[:10]:>11}" for label in labels))
    for branch, r in results.items():
        print(f"{branch:<18}" + "".join(f"{r[label]:11.3f}" if label in r else f"{'-':>11}" for label in labels))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
