"""G-TAD: sub-graph localization for temporal action detection (Xu et al., CVPR 2020).

The head treats the T snippets as graph nodes with two kinds of edges: temporal edges to
the neighbouring snippets (a grouped 1D conv) and semantic edges to the k nearest snippets
in feature space, recomputed from the features at every block (an edge conv max-pooled over
the k neighbours). GCNeXt blocks fuse both with the identity, ResNeXt style (cardinality
32 of width 4 in the official code). Start/end node probabilities come from the node
features after the first block; SGAlign turns every anchor (sub-graph) into a feature
vector, and 2D convs over the anchor map predict each anchor's IoU with the ground truth
as a classification score and a regression score.

Conventions (shared with BMN, see lofi/heads/common.py): maps are (B, D, T) "duration x
start"; cell [d, s] is the proposal from snippet s to snippet s + d inclusive, i.e.
seconds [s * dl, (s + d + 1) * dl) on the snippet grid of lofi/fidelity.py, and valid
only where s + d < T. The official code's map is already indexed [duration, start].

SGAlign here works in the coordinates of that grid: feature t sits at position t (the
centre of snippet t), so proposal [d, s] covers positions [s - 0.5, s + d + 0.5]. With
`context` the region grows by half its length on both sides (the official expand ratio
0.5), it is cut into `num_align_samples` equal bins, and each bin is the mean of
linearly interpolated features at ceil(region / bins) evenly spaced points (the official
"sample all frames" mode). Beyond the video's ends features are zero. The same sampling
runs on the node features and on their semantic-neighbour mean (the official "last layer
context" style), and the concatenation feeds a 1x1 conv.

Memory: the official code materialises C x 32 aligned values for all T x D anchors before
that 1x1 conv (8192 channels over a 100 x 100 map). Interpolation is linear, so the conv
is applied per sample first (a (B, N * O, T) tensor) and the interpolation afterwards as
one sparse matmul over the valid anchors only; `SGAlign.align` keeps the explicit form.

Loss (`gtad_loss`): as the official training script weights it, node (start/end) loss +
IoU regression loss + 10 x IoU classification loss, where the classification loss is
BMN's weighted logistic loss with G-TAD's +10 smoothing of the counts. The class-aware
detection path of the project (ClassBranch) adds `class_weight` x its multi-label loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from lofi.heads.common import ClassBranch, HeadOutput, tal_loss, valid_map_mask
from lofi.targets import TALTargets

# Official sizes: h_dim_1d 256 -> anchor conv 512 (h_dim_3d) -> 2D convs 128 (h_dim_2d).
ALIGN_WIDTH_FACTOR = 2
MAP_WIDTH_DIVISOR = 2
GROUP_WIDTH = 4  # channels per group in the GCNeXt bottleneck (ResNeXt's "32x4d")


def knn_indices(x: Tensor, k: int) -> Tensor:
    """The k nearest snippets of every snippet in feature space, itself included.

    x: (B, C, T) -> (B, T, k) indices, nearest first. No gradient flows through a choice
    of neighbours, so the distances are computed without autograd (saves a (B, T, T) graph).
    """
    k = min(k, x.shape[-1])
    with torch.no_grad():
        xt = x.detach().transpose(1, 2).float()  # (B, T, C)
        dist = torch.cdist(xt, xt)  # (B, T, T)
        return dist.topk(k, dim=-1, largest=False).indices


def gather_neighbours(x: Tensor, idx: Tensor) -> Tensor:
    """x: (B, C, T), idx: (B, T, k) -> the neighbours' features (B, C, T, k)."""
    batch = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
    neighbours = x.transpose(1, 2)[batch, idx]  # (B, T, k, C)
    return neighbours.permute(0, 3, 1, 2)


class GCNeXt(nn.Module):
    """One GCNeXt block: relu(x + temporal graph conv(x) + semantic graph conv(x)), (B, C, T) -> same.

    The semantic branch is an edge conv: for every snippet and each of its k nearest
    neighbours the pair (neighbour, snippet) goes through 1x1 -> grouped 1x1 -> 1x1 convs,
    and the k results are max-pooled. The temporal branch is the same bottleneck with a
    grouped kernel-3 conv over the time axis (edges to the previous and next snippet).
    """

    def __init__(self, channels: int, knn_k: int = 3, cardinality: int = 32):
        super().__init__()
        if channels % cardinality:
            raise ValueError(f"cardinality {cardinality} must divide the hidden size {channels}")
        self.knn_k = knn_k
        width = GROUP_WIDTH * cardinality
        self.temporal = nn.Sequential(
            nn.Conv1d(channels, width, kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv1d(width, width, kernel_size=3, padding=1, groups=cardinality), nn.ReLU(inplace=True),
            nn.Conv1d(width, channels, kernel_size=1),
        )  # fmt: skip
        self.semantic = nn.Sequential(
            nn.Conv2d(2 * channels, width, kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=1, groups=cardinality), nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, kernel_size=1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        neighbours = gather_neighbours(x, knn_indices(x, self.knn_k))  # (B, C, T, k)
        centre = x.unsqueeze(-1).expand_as(neighbours)  # (B, C, T, k)
        edges = self.semantic(torch.cat([neighbours, centre], dim=1))  # (B, C, T, k)
        return torch.relu(x + self.temporal(x) + edges.amax(dim=-1))


def neighbour_mean(x: Tensor, k: int) -> Tensor:
    """Each snippet's mean over its k nearest snippets in feature space: (B, C, T) -> (B, C, T)."""
    return gather_neighbours(x, knn_indices(x, k)).mean(dim=-1)


def align_points(
    num_snippets: int, cells: np.ndarray, num_samples: int, expand_ratio: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Interpolation weights of SGAlign as (anchor, bin, snippet, weight) entries.

    cells: (A, 2) valid (d, s) cells. Bin j of anchor a is sum_t weight * feature[t] over
    its entries; a bin's weights sum to 1 unless part of it lies outside the video.
    """
    d, s = cells[:, 0].astype(np.float64), cells[:, 1].astype(np.float64)
    length = d + 1.0
    lo = s - 0.5 - expand_ratio * length  # region in snippet-centre coordinates
    hi = s + d + 0.5 + expand_ratio * length
    bin_len = (hi - lo) / num_samples
    per_bin = np.ceil(bin_len - 1e-9).astype(np.int64)  # official: ceil(region / N) points a bin
    j = np.arange(num_samples).reshape(1, -1, 1)
    i = np.arange(per_bin.max()).reshape(1, 1, -1)
    step = (bin_len / per_bin)[:, None, None]
    pos = lo[:, None, None] + j * bin_len[:, None, None] + (i + 0.5) * step  # (A, N, P)
    inside = (i < per_bin[:, None, None]) & (pos >= -0.5) & (pos <= num_snippets - 0.5)
    weight = inside / per_bin[:, None, None]
    pos = np.clip(pos, 0.0, num_snippets - 1.0)
    t0 = np.floor(pos).astype(np.int64)
    t1 = np.minimum(t0 + 1, num_snippets - 1)
    frac = pos - t0
    anchor = np.broadcast_to(np.arange(len(cells)).reshape(-1, 1, 1), pos.shape).ravel()
    bins = np.broadcast_to(j, pos.shape).ravel()
    # every point contributes to its two neighbouring snippets
    anchor, bins = np.tile(anchor, 2), np.tile(bins, 2)
    snippet = np.concatenate([t0.ravel(), t1.ravel()])
    value = np.concatenate([(weight * (1.0 - frac)).ravel(), (weight * frac).ravel()])
    keep = value > 0
    return anchor[keep], bins[keep], snippet[keep], value[keep]


class SGAlign(nn.Module):
    """Sub-graph of interest alignment followed by its 1x1 conv: (B, C, T) -> (B, O, D, T).

    `forward(x)` equals `proj` applied to the C x N sampled values of every valid anchor
    (`align(x)`, zero at invalid cells), computed without materialising them: the conv
    is applied per sample bin first, then the interpolation as one sparse matmul.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_snippets: int,
        max_duration: int,
        num_samples: int = 16,
        expand_ratio: float = 0.5,
    ):
        super().__init__()
        self.num_snippets, self.max_duration, self.num_samples = num_snippets, max_duration, num_samples
        cells = valid_map_mask(num_snippets, max_duration).nonzero().numpy()  # (A, 2) as (d, s)
        anchor, bins, snippet, weight = align_points(num_snippets, cells, num_samples, expand_ratio)
        num_anchors, T, N = len(cells), num_snippets, num_samples
        # Plain attributes, not buffers: DDP cannot broadcast sparse buffers, and they are
        # a pure function of the sizes, so they need no place in a checkpoint.
        self._cell_index = torch.as_tensor(cells[:, 0] * T + cells[:, 1])
        self._matrices = {
            "fused": _sparse(anchor, bins * T + snippet, weight, (num_anchors, N * T)),
            "explicit": _sparse(anchor * N + bins, snippet, weight, (num_anchors * N, T)),
        }
        self._cache: dict[tuple[str, torch.device], Tensor] = {}
        self.proj = nn.Linear(in_channels * num_samples, out_channels)

    def _matrix(self, name: str, device: torch.device) -> Tensor:
        if (name, device) not in self._cache:
            self._cache[(name, device)] = self._matrices[name].to(device)
        return self._cache[(name, device)]

    def _to_map(self, per_anchor: Tensor) -> Tensor:
        """(B, X, A) values of the valid anchors -> (B, X, D, T) map, zero at invalid cells."""
        B, X, _ = per_anchor.shape
        index = self._cell_index.to(per_anchor.device)
        flat = per_anchor.new_zeros(B, X, self.max_duration * self.num_snippets)
        return flat.index_copy(2, index, per_anchor).view(B, X, self.max_duration, self.num_snippets)

    def align(self, x: Tensor) -> Tensor:
        """The sampled features themselves: (B, C, T) -> (B, C, N, D, T)."""
        B, C, T = x.shape
        N = self.num_samples
        flat = x.reshape(B * C, T).t().float()  # (T, B*C)
        sampled = _sparse_mm(self._matrix("explicit", x.device), flat)  # (A*N, B*C)
        sampled = sampled.view(-1, N, B, C).permute(2, 3, 1, 0).reshape(B, C * N, -1)  # (B, C*N, A)
        return self._to_map(sampled.to(x.dtype)).view(B, C, N, self.max_duration, T)

    def forward(self, x: Tensor) -> Tensor:
        B, C, T = x.shape
        N, O = self.num_samples, self.proj.out_features
        weight = self.proj.weight.view(O, C, N)
        per_bin = torch.einsum("ocn,bct->ntbo", weight, x).reshape(N * T, B * O)
        per_anchor = _sparse_mm(self._matrix("fused", x.device), per_bin)  # (A, B*O)
        per_anchor = per_anchor.to(x.dtype).view(-1, B, O).permute(1, 2, 0)  # (B, O, A)
        return self._to_map(per_anchor) + self.proj.bias.view(1, O, 1, 1)


def _sparse_mm(matrix: Tensor, dense: Tensor) -> Tensor:
    """Sparse (M, K) @ dense (K, P) in float32, autocast off: sparse kernels lack half precision
    on some devices, and autocast would cast the sparse operand."""
    with torch.autocast(dense.device.type, enabled=False):
        return torch.sparse.mm(matrix, dense.float())


def _sparse(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, size: tuple[int, int]) -> Tensor:
    index = torch.as_tensor(np.stack([rows, cols]))
    values_t = torch.as_tensor(values, dtype=torch.float32)
    return torch.sparse_coo_tensor(index, values_t, size, check_invariants=True).coalesce()


class GTAD(nn.Module):
    """G-TAD head: snippet features (B, C, T) -> HeadOutput with (B, D, T) maps.

    Layout as the official code: a grouped kernel-3 conv to `hidden` channels, then
    `num_gcnext` GCNeXt blocks (official: 2). Start and end each have their own GCNeXt + 1x1
    conv over the features after the first block; SGAlign reads the last block's features
    and their semantic-neighbour mean. Anchor features go through 1x1 convs
    (2 * hidden -> hidden / 2) and two 3x3 convs to the two IoU maps. `num_align_samples`
    bins per stream (official: 16 + 16); `context` extends each anchor by half its length
    on both sides (official); the class branch reads the last block's features.
    """

    def __init__(
        self,
        feature_dim: int,
        num_snippets: int,
        max_duration: int,
        num_classes: int,
        hidden: int = 256,
        knn_k: int = 3,
        cardinality: int = 32,
        num_gcnext: int = 2,
        num_align_samples: int = 16,
        context: bool = True,
    ):
        super().__init__()
        if not 1 <= max_duration <= num_snippets:
            raise ValueError(f"max_duration must be in [1, num_snippets={num_snippets}], got {max_duration}")
        if hidden % cardinality or hidden % MAP_WIDTH_DIVISOR:
            raise ValueError(f"hidden ({hidden}) must be even and divisible by cardinality ({cardinality})")
        if num_gcnext < 1 or knn_k < 1 or num_align_samples < 1:
            raise ValueError("num_gcnext, knn_k and num_align_samples must be >= 1")
        self.num_snippets, self.max_duration, self.knn_k = num_snippets, max_duration, knn_k
        # official: groups=4 over 2048-d (TSN) / 400-d features; fall back when 4 does not divide
        stem_groups = math.gcd(4, feature_dim)
        self.stem = nn.Sequential(
            nn.Conv1d(feature_dim, hidden, kernel_size=3, padding=1, groups=stem_groups),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.ModuleList(GCNeXt(hidden, knn_k, cardinality) for _ in range(num_gcnext))
        self.start_head = self._node_head(hidden, knn_k, cardinality)
        self.end_head = self._node_head(hidden, knn_k, cardinality)
        align_width, map_width = ALIGN_WIDTH_FACTOR * hidden, hidden // MAP_WIDTH_DIVISOR
        self.align = SGAlign(
            2 * hidden, align_width, num_snippets, max_duration, num_align_samples, 0.5 if context else 0.0
        )
        self.localization = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(align_width, map_width, kernel_size=1), nn.ReLU(inplace=True),
            nn.Conv2d(map_width, map_width, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(map_width, map_width, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(map_width, 2, kernel_size=1), nn.Sigmoid(),
        )  # fmt: skip
        self.class_branch = ClassBranch(hidden, num_classes, hidden)

    @staticmethod
    def _node_head(hidden: int, knn_k: int, cardinality: int) -> nn.Module:
        block = GCNeXt(hidden, knn_k, cardinality)
        return nn.Sequential(block, nn.Conv1d(hidden, 1, kernel_size=1), nn.Sigmoid())

    def forward(self, features: Tensor) -> HeadOutput:
        if features.shape[-1] != self.num_snippets:
            raise ValueError(
                f"G-TAD was built for {self.num_snippets} snippets, got features {tuple(features.shape)}"
            )
        x = self.blocks[0](self.stem(features))  # (B, H, T)
        first = x
        for block in self.blocks[1:]:
            x = block(x)
        start = self.start_head(first).squeeze(1)  # (B, T)
        end = self.end_head(first).squeeze(1)
        anchors = self.align(torch.cat([x, neighbour_mean(x, self.knn_k)], dim=1))  # (B, 2H, D, T)
        iou = self.localization(anchors)  # (B, 2, D, T)
        # official channel order: 0 = regression, 1 = classification
        return HeadOutput(
            start=start, end=end, iou_cls=iou[:, 1], iou_reg=iou[:, 0], class_logits=self.class_branch(x)
        )


def gtad_loss(
    out: HeadOutput,
    targets: TALTargets,
    cls_weight: float = 10.0,
    reg_weight: float = 1.0,
    class_weight: float = 1.0,
    count_smoothing: float = 10.0,
    boundary_pos_threshold: float = 0.5,
    cls_pos_threshold: float = 0.9,
    reg_high: float = 0.7,
    reg_low: float = 0.3,
) -> dict[str, Tensor]:
    """G-TAD's loss: node + reg_weight * iou_reg + cls_weight * iou_cls (+ class_weight * classes).

    The official training script sums the node loss and `subgraph_loss_func`, which puts
    weight 1 on the IoU regression (L2) map and 10 on the classification (logistic) map,
    the reverse of BMN's 10 x regression. Keys as `tal_loss`: boundary, iou_cls, iou_reg,
    classes, total. The BMN pieces (node loss, balanced regression sampling, class loss)
    are common.tal_loss's, which also checks the shapes; G-TAD adds 10 to the positive and
    negative counts of the classification loss (official: "in case of nan").
    """
    return tal_loss(
        out, targets, reg_weight=reg_weight, class_weight=class_weight, cls_weight=cls_weight,
        boundary_pos_threshold=boundary_pos_threshold, cls_pos_threshold=cls_pos_threshold,
        reg_high=reg_high, reg_low=reg_low, count_smoothing=count_smoothing,
    )  # fmt: skip
