"""Unsupervised segmentation metrics: the field's protocol (as in IIC, PiCIE, STEGO).

Evaluation never holds all predictions in memory: each batch is folded into a
streaming confusion matrix on the device (`ConfusionMatrix`, via `torch.bincount`).
Clusters carry no class names, so the summed matrix is matched to classes
(Hungarian one-to-one when K <= C, many-to-one majority when over-clustering) and
pixel accuracy / mIoU are read off the matched matrix (`segmentation_scores`).
The second number is a linear probe on frozen pixel embeddings (`fit_linear_probe`),
fitted on train pixels and scored on val through a confusion matrix of its own.

Everything returned for logging is plain Python (floats, lists) so it can be
JSON-dumped or sent to MLflow as is.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Streaming [n_clusters, n_classes] pixel-count matrix (rows: predicted cluster, cols: class).

    It lives on `device` so updates never copy predictions to the host. In a
    distributed evaluation each process sees a slice of the data: the `matrix`
    tensors of all processes must be summed (all-reduce, or `merge`) *before*
    matching, because matching per process and averaging scores is wrong.
    """

    def __init__(
        self,
        n_clusters: int,
        n_classes: int,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
    ) -> None:
        if n_clusters < 1 or n_classes < 1:
            raise ValueError(
                f"ConfusionMatrix needs n_clusters >= 1 and n_classes >= 1, "
                f"got n_clusters={n_clusters}, n_classes={n_classes}"
            )
        self.n_clusters = n_clusters
        self.n_classes = n_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(n_clusters, n_classes, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of integer predictions and labels (any matching shapes)."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
            )
        pred = pred.reshape(-1).to(device=self.device, dtype=torch.int64)
        target = target.reshape(-1).to(device=self.device, dtype=torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        # One host sync per batch for both range checks.
        t_min, t_max, p_min, p_max = torch.stack(
            [target.min(), target.max(), pred.min(), pred.max()]
        ).tolist()
        if t_min < 0 or t_max >= self.n_classes:
            bad = t_min if t_min < 0 else t_max
            raise ValueError(
                f"label id {bad} is out of range: allowed 0..{self.n_classes - 1} "
                f"or ignore_index={self.ignore_index}"
            )
        if p_min < 0 or p_max >= self.n_clusters:
            bad = p_min if p_min < 0 else p_max
            raise ValueError(
                f"predicted cluster id {bad} is out of range: allowed 0..{self.n_clusters - 1}"
            )
        counts = torch.bincount(
            pred * self.n_classes + target, minlength=self.n_clusters * self.n_classes
        )
        self.matrix += counts.reshape(self.n_clusters, self.n_classes)

    def merge(self, other: ConfusionMatrix | Tensor) -> ConfusionMatrix:
        """Add another matrix (e.g. another process's slice) into this one, in place."""
        other_matrix = other.matrix if isinstance(other, ConfusionMatrix) else other
        if tuple(other_matrix.shape) != tuple(self.matrix.shape):
            raise ValueError(
                f"cannot merge confusion matrices of shapes {tuple(self.matrix.shape)} "
                f"and {tuple(other_matrix.shape)}"
            )
        self.matrix += other_matrix.to(device=self.device, dtype=torch.int64)
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix holding the sum; neither operand changes."""
        total = ConfusionMatrix(self.n_clusters, self.n_classes, self.ignore_index, self.device)
        total.merge(self)
        return total.merge(other)

    def reset(self) -> None:
        self.matrix.zero_()

    def numpy(self) -> np.ndarray:
        """The matrix on the host, for matching and scoring."""
        return self.matrix.detach().cpu().numpy()


def _as_numpy(matrix: np.ndarray | Tensor | ConfusionMatrix) -> np.ndarray:
    if isinstance(matrix, ConfusionMatrix):
        return matrix.numpy()
    if isinstance(matrix, Tensor):
        return matrix.detach().cpu().numpy()
    return np.asarray(matrix)


def hungarian_match(matrix: np.ndarray | Tensor) -> np.ndarray:
    """One-to-one cluster -> class assignment maximising matched pixels (-1: left unassigned)."""
    m = _as_numpy(matrix).astype(np.float64)
    # Imported here: scipy.optimize costs 0.24 s, in every process that imports san (Ray
    # starts several per run), and only the evaluating rank matches clusters.
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(m, maximize=True)
    mapping = np.full(m.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def majority_match(matrix: np.ndarray | Tensor) -> np.ndarray:
    """Many-to-one: each cluster -> the class most of its pixels belong to (-1: empty cluster)."""
    m = _as_numpy(matrix)
    mapping = m.argmax(axis=1).astype(np.int64)
    mapping[m.sum(axis=1) == 0] = -1
    return mapping


def match_clusters(matrix: np.ndarray | Tensor) -> np.ndarray:
    """The protocol's matching: Hungarian when K <= C, majority when over-clustering (K > C)."""
    m = _as_numpy(matrix)
    n_clusters, n_classes = m.shape
    return hungarian_match(m) if n_clusters <= n_classes else majority_match(m)


def collapse(matrix: np.ndarray | Tensor, mapping: np.ndarray) -> np.ndarray:
    """Sum the cluster rows into class rows by `mapping`: a [C, C] (predicted class, true) matrix.

    Rows of unassigned clusters (-1) are dropped, so their pixels count as misses.
    """
    m = _as_numpy(matrix).astype(np.float64)
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.shape != (m.shape[0],):
        raise ValueError(f"mapping has shape {mapping.shape}, expected ({m.shape[0]},)")
    n_classes = m.shape[1]
    if mapping.max(initial=-1) >= n_classes or mapping.min(initial=0) < -1:
        raise ValueError(f"mapping values must lie in -1..{n_classes - 1}")
    collapsed = np.zeros((n_classes, n_classes), dtype=np.float64)
    assigned = mapping >= 0
    np.add.at(collapsed, mapping[assigned], m[assigned])
    return collapsed


def segmentation_scores(
    matrix: np.ndarray | Tensor | ConfusionMatrix,
    mapping: np.ndarray | list[int] | None = None,
    class_names: list[str] | None = None,
) -> dict:
    """Pixel accuracy and mIoU after matching clusters to classes.

    `matrix` must already be summed over all processes. Without `mapping`,
    `match_clusters` picks it. IoU per class is TP / (TP + FP + FN) on the collapsed
    C x C matrix. A class absent from both the prediction and the target has no
    IoU: it is reported as 0.0 in `per_class_iou`, flagged False in `present`, and
    excluded from `miou` (so the output is NaN-free and JSON-safe).
    """
    m = _as_numpy(matrix).astype(np.float64)
    n_classes = m.shape[1]
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"got {len(class_names)} class_names for {n_classes} classes")
    mapping = match_clusters(m) if mapping is None else np.asarray(mapping, dtype=np.int64)
    cc = collapse(m, mapping)
    total = m.sum()
    tp = np.diag(cc)
    fp = cc.sum(axis=1) - tp
    fn = m.sum(axis=0) - tp  # true pixels of the class not matched (incl. unassigned clusters)
    denom = tp + fp + fn
    present = denom > 0
    iou = np.where(present, tp / np.maximum(denom, 1.0), 0.0)
    scores: dict = {
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "per_class_iou": [float(x) for x in iou],
        "present": [bool(x) for x in present],
        "mapping": [int(x) for x in mapping],
        "n_pixels": int(total),
    }
    if class_names is not None:
        scores["class_names"] = list(class_names)
    return scores


def class_metric_name(class_name: str) -> str:
    """The per-class metric's name part for a class: its characters other than letters,
    digits, "_-.:/" and space become "_". Metric names allow only those (MLflow refuses a
    batch with one bad key, so a class called "road (paved)" lost every metric of a run)."""
    return re.sub(r"[^\w\-.:/ ]", "_", class_name, flags=re.ASCII)


def scalar_metrics(scores: dict, prefix: str = "") -> dict[str, float]:
    """Flatten `segmentation_scores` output into {name: float} for MLflow's log_metrics:
    pixel_accuracy, miou and iou/<`class_metric_name`> for each class present."""
    out = {f"{prefix}pixel_accuracy": scores["pixel_accuracy"], f"{prefix}miou": scores["miou"]}
    names = scores.get("class_names") or [str(i) for i in range(len(scores["per_class_iou"]))]
    for name, iou, present in zip(names, scores["per_class_iou"], scores["present"], strict=True):
        if present:
            out[f"{prefix}iou/{class_metric_name(name)}"] = iou
    return out


def random_assignment_scores(
    matrix_or_class_counts: np.ndarray | Tensor | ConfusionMatrix,
    n_clusters: int,
    seed: int = 0,
) -> dict:
    """The floor a trained model must beat: every pixel gets a uniformly random cluster.

    Computed by simulation, exactly in distribution and without materialising
    pixels: the cluster counts of class c's n_c pixels under uniform random
    assignment are Multinomial(n_c, 1/K), so one multinomial draw per class (seeded)
    gives a confusion matrix distributed exactly as the per-pixel one. It is then
    matched and scored like a real model (`match_clusters`, `segmentation_scores`).
    Accepts a [K', C] confusion matrix (its column sums are the class counts) or
    the [C] class pixel counts.
    """
    counts = _as_numpy(matrix_or_class_counts)
    if counts.ndim == 2:
        counts = counts.sum(axis=0)
    counts = counts.astype(np.int64)
    rng = np.random.default_rng(seed)
    probs = np.full(n_clusters, 1.0 / n_clusters)
    simulated = np.stack([rng.multinomial(int(n), probs) for n in counts], axis=1)
    return segmentation_scores(simulated)


class LinearProbe:
    """A fitted linear probe: class logits from pixel embeddings, the train features'
    standardisation folded into its weights, so it applies to raw embeddings as they come.
    """

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        self.weight = weight  # [n_classes, D]
        self.bias = bias  # [n_classes]

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def to(self, device: torch.device | str) -> LinearProbe:
        return LinearProbe(self.weight.to(device), self.bias.to(device))

    @torch.no_grad()
    def __call__(self, feats: Tensor) -> Tensor:
        """[N, D] -> [N, n_classes] logits."""
        return torch.addmm(self.bias, feats.float(), self.weight.T)

    @torch.no_grad()
    def dense(self, z: Tensor) -> Tensor:
        """Embedding maps [B, D, h, w] -> class logits [B, n_classes, h, w]."""
        logits = torch.einsum("cd,bdhw->bchw", self.weight, z.float())
        return logits + self.bias[None, :, None, None]


def fit_linear_probe(
    feats: Tensor,
    labels: Tensor,
    n_classes: int,
    steps: int = 100,
    ignore_index: int = IGNORE_INDEX,
) -> LinearProbe:
    """STEGO's second number, fitted: how linearly readable the frozen pixel embeddings are.

    Multinomial logistic regression on standardised features, full batch, from zero
    weights, by at most `steps` L-BFGS iterations (strong Wolfe line search): a convex fit
    run to convergence, so the number measures the embeddings, not how far an optimiser
    got. On CamVid embeddings (16k pixels, 11 classes) the val probe mIoU moved 0.001
    from 100 to 300 iterations, where 100 Adam steps stopped 0.03 short of it (1000:
    0.007 short, in 8x the time). Deterministic; pixels labelled `ignore_index` are
    dropped, and the caller subsamples pixels to what fits in memory.
    """
    # Callers often evaluate under inference_mode/no_grad; the fit needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_linear_probe(feats, labels, n_classes, steps, ignore_index)


def probe_scores(matrix: np.ndarray | Tensor | ConfusionMatrix) -> dict[str, float]:
    """Pixel accuracy and mIoU of a probe's [n_classes, n_classes] confusion matrix."""
    scores = segmentation_scores(matrix, mapping=np.arange(_as_numpy(matrix).shape[0]))
    return {"probe_pixel_accuracy": scores["pixel_accuracy"], "probe_miou": scores["miou"]}


def _labelled(
    feats: Tensor, labels: Tensor, n_classes: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """The labelled rows of [N, D] feats and [N] labels; a one-line error for bad input."""
    if feats.ndim != 2 or labels.shape != feats.shape[:1]:
        raise ValueError(
            f"train: expected feats [N, D] and labels [N], got "
            f"{tuple(feats.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.to(device=feats.device, dtype=torch.int64)
    keep = labels != ignore_index
    # clone(): inputs made under inference_mode cannot be saved for backward.
    feats, labels = feats.detach()[keep].float().clone(), labels[keep]
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if bad.numel():
        raise ValueError(
            f"train: label id {int(bad[0])} is out of range: allowed 0..{n_classes - 1} "
            f"or ignore_index={ignore_index}"
        )
    return feats, labels


def _fit_linear_probe(
    feats: Tensor, labels: Tensor, n_classes: int, steps: int, ignore_index: int
) -> LinearProbe:
    x, y = _labelled(feats, labels, n_classes, ignore_index)
    if x.shape[0] == 0:
        raise ValueError("linear_probe: no labelled training pixels")
    mean = x.mean(dim=0)
    std = x.std(dim=0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(mean)
    x = (x - mean) / std

    weight = torch.zeros(n_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(n_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def loss() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = torch.nn.functional.cross_entropy(torch.addmm(bias, x, weight.T), y)
        value.backward()
        return value

    if steps:
        optimizer.step(loss)
    with torch.no_grad():
        # W (x - m) / s + b == (W / s) x + (b - (W / s) m)
        folded = weight / std
        return LinearProbe(folded.detach(), (bias - folded @ mean).detach())
