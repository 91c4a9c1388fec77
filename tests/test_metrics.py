"""Metrics: the numbers every run is judged by, so they are checked against hand computations."""

import numpy as np
import pytest
import torch

from san.metrics import (
    ConfusionMatrix,
    fit_linear_probe,
    hungarian_match,
    majority_match,
    match_clusters,
    probe_scores,
    random_assignment_scores,
    scalar_metrics,
    segmentation_scores,
)

# Rows: predicted cluster, cols: true class.
SMALL = np.array(
    [
        [2, 8, 0],
        [5, 1, 1],
        [0, 2, 6],
    ]
)


def test_hungarian_recovers_known_permutation_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 32, 32), generator=gen)
    permutation = torch.tensor([3, 0, 4, 1, 2])  # class c is predicted as cluster permutation[c]
    cm = ConfusionMatrix(5, 5)
    cm.update(permutation[target], target)
    mapping = match_clusters(cm.matrix)
    assert mapping.tolist() == torch.argsort(permutation).tolist()
    scores = segmentation_scores(cm)
    assert scores["pixel_accuracy"] == 1.0
    assert scores["miou"] == 1.0


def test_hand_computed_3x3() -> None:
    # Hungarian: cluster0->class1 (8), cluster1->class0 (5), cluster2->class2 (6) = 19 pixels;
    # every other assignment scores <= 9. Total pixels 25, so accuracy 19/25 = 0.76.
    # Collapsed rows (predicted class): class0 = [5,1,1], class1 = [2,8,0], class2 = [0,2,6].
    # True class totals (column sums) 7, 11, 7; predicted totals 7, 10, 8.
    # IoU0 = 5/(7+7-5) = 5/9, IoU1 = 8/(10+11-8) = 8/13, IoU2 = 6/(8+7-6) = 2/3.
    scores = segmentation_scores(SMALL)
    assert scores["mapping"] == [1, 0, 2]
    assert scores["pixel_accuracy"] == pytest.approx(19 / 25)
    assert scores["per_class_iou"] == pytest.approx([5 / 9, 8 / 13, 2 / 3])
    assert scores["miou"] == pytest.approx((5 / 9 + 8 / 13 + 2 / 3) / 3)
    assert scores["n_pixels"] == 25


def test_scores_are_plain_python_and_json_safe() -> None:
    import json

    scores = segmentation_scores(torch.from_numpy(SMALL), class_names=["sky", "road", "car"])
    text = json.dumps(scores, allow_nan=False)
    assert json.loads(text)["class_names"] == ["sky", "road", "car"]
    flat = scalar_metrics(scores, prefix="val/")
    assert flat["val/iou/road"] == pytest.approx(8 / 13)
    assert all(isinstance(v, float) for v in flat.values())


def test_over_clustering_uses_majority_matching() -> None:
    over = np.array(
        [
            [9, 1],  # -> class 0
            [3, 7],  # -> class 1
            [6, 0],  # -> class 0
            [0, 0],  # empty -> -1
        ]
    )
    # Correct pixels 9 + 7 + 6 = 22 of 26. Collapsed: class0 = [15, 1], class1 = [3, 7];
    # true totals 18, 8. IoU0 = 15/(16+18-15) = 15/19, IoU1 = 7/(10+8-7) = 7/11.
    assert match_clusters(over).tolist() == [0, 1, 0, -1]
    scores = segmentation_scores(over)
    assert scores["pixel_accuracy"] == pytest.approx(22 / 26)
    assert scores["per_class_iou"] == pytest.approx([15 / 19, 7 / 11])
    # Hungarian alone would only use one cluster per class.
    assert sorted(hungarian_match(over).tolist()) == [-1, -1, 0, 1]
    assert majority_match(over).tolist() == [0, 1, 0, -1]


def test_class_absent_from_prediction_and_target_is_excluded_from_miou() -> None:
    matrix = np.array([[4, 0, 0], [1, 3, 0]])  # class 2 never occurs nor is predicted
    scores = segmentation_scores(matrix)
    # mapping [0, 1]: IoU0 = 4/(4+5-4) = 4/5, IoU1 = 3/(4+3-3) = 3/4.
    assert scores["present"] == [True, True, False]
    assert scores["per_class_iou"] == pytest.approx([4 / 5, 3 / 4, 0.0])
    assert scores["miou"] == pytest.approx((4 / 5 + 3 / 4) / 2)


def test_ignore_index_pixels_are_skipped() -> None:
    target = torch.tensor([[0, 1, 255], [255, 2, 2]])
    pred = torch.tensor([[0, 1, 99], [-5, 2, 1]])  # garbage under ignored pixels is fine
    cm = ConfusionMatrix(3, 3)
    cm.update(pred, target)
    expected = np.zeros((3, 3), dtype=np.int64)
    expected[0, 0] = expected[1, 1] = expected[2, 2] = expected[1, 2] = 1
    np.testing.assert_array_equal(cm.numpy(), expected)
    cm.reset()
    assert int(cm.matrix.sum()) == 0


def test_halves_sum_to_whole() -> None:
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (6, 20, 20), generator=gen)
    target[target == 3] = 255
    pred = torch.randint(0, 6, (6, 20, 20), generator=gen)
    whole, first, second = ConfusionMatrix(6, 4), ConfusionMatrix(6, 4), ConfusionMatrix(6, 4)
    whole.update(pred, target)
    first.update(pred[:3], target[:3])
    second.update(pred[3:], target[3:])
    summed = first + second
    assert torch.equal(summed.matrix, whole.matrix)
    assert int(first.matrix.sum()) > 0  # + left its operands alone
    assert torch.equal(first.merge(second.matrix).matrix, whole.matrix)
    assert segmentation_scores(summed) == segmentation_scores(whole)


def test_out_of_range_label_is_a_one_line_error() -> None:
    cm = ConfusionMatrix(27, 27)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[1, 2, 3] = 30
    with pytest.raises(ValueError) as info:
        cm.update(torch.zeros_like(target), target)
    message = str(info.value)
    assert "\n" not in message
    assert "30" in message and "0..26" in message and "255" in message
    with pytest.raises(ValueError, match="cluster id 27"):
        cm.update(torch.full((3,), 27), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    assert int(cm.matrix.sum()) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulates_on_cuda() -> None:
    cm = ConfusionMatrix(3, 3, device="cuda")
    cm.update(torch.tensor([0, 1, 2], device="cuda"), torch.tensor([0, 1, 255], device="cuda"))
    assert cm.matrix.device.type == "cuda"
    assert cm.numpy().sum() == 2


def test_random_assignment_floor() -> None:
    counts = np.array([5000, 3000, 2000])
    floor = random_assignment_scores(counts, n_clusters=3, seed=0)
    # Expected matrix has every row = counts / 3, so any one-to-one matching hits ~1/3.
    assert floor["pixel_accuracy"] == pytest.approx(1 / 3, abs=0.02)
    assert floor["pixel_accuracy"] < 1.0 and floor["miou"] < 0.3
    # Agrees with an actual per-pixel random predictor.
    gen = torch.Generator().manual_seed(2)
    target = torch.cat([torch.full((int(n),), c) for c, n in enumerate(counts)])
    cm = ConfusionMatrix(3, 3)
    cm.update(torch.randint(0, 3, target.shape, generator=gen), target)
    simulated = segmentation_scores(cm)
    assert floor["pixel_accuracy"] == pytest.approx(simulated["pixel_accuracy"], abs=0.02)
    assert floor["miou"] == pytest.approx(simulated["miou"], abs=0.02)
    # A matrix works as input too, and over-clustering floors at the majority class share.
    over = random_assignment_scores(np.diag(counts), n_clusters=10, seed=0)
    assert over["pixel_accuracy"] == pytest.approx(0.5, abs=0.01)
    assert random_assignment_scores(counts, 3, seed=0) == floor


def _blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    labels = torch.randint(0, 3, (n,), generator=gen)
    feats = centres[labels] + torch.randn(n, 4, generator=gen) * 0.5
    return feats, labels


def linear_probe(train_x, train_y, val_x, val_y, n_classes: int) -> dict[str, float]:
    """Fit on the train pixels, score on the val pixels, as evaluation does."""
    probe = fit_linear_probe(train_x, train_y, n_classes)
    matrix = ConfusionMatrix(n_classes, n_classes)
    matrix.update(probe(val_x).argmax(dim=1), val_y)
    return probe_scores(matrix)


def test_linear_probe_on_separable_features() -> None:
    gen = torch.Generator().manual_seed(3)
    train_x, train_y = _blobs(2000, gen)
    val_x, val_y = _blobs(1000, gen)
    train_y[:100] = 255  # ignored pixels must not break training
    with torch.inference_mode():  # evaluation code calls it like this
        result = linear_probe(train_x, train_y, val_x, val_y, n_classes=3)
    assert set(result) == {"probe_pixel_accuracy", "probe_miou"}
    assert result["probe_pixel_accuracy"] > 0.95
    assert result["probe_miou"] > 0.9


def test_linear_probe_on_random_labels_is_near_chance() -> None:
    gen = torch.Generator().manual_seed(4)
    train_x, val_x = torch.randn(2000, 8, generator=gen), torch.randn(2000, 8, generator=gen)
    train_y = torch.randint(0, 4, (2000,), generator=gen)
    val_y = torch.randint(0, 4, (2000,), generator=gen)
    result = linear_probe(train_x, train_y, val_x, val_y, n_classes=4)
    assert 0.15 < result["probe_pixel_accuracy"] < 0.35


def test_linear_probe_rejects_bad_labels() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="label id 7"):
        linear_probe(x, torch.full((10,), 7), x, torch.zeros(10, dtype=torch.long), n_classes=3)


def test_fitted_probe_reads_raw_embeddings_with_its_standardisation_folded_in() -> None:
    """The probe is fitted on standardised features but applied to raw embeddings (a whole
    map at a time in evaluation): far-off, badly scaled features must read the same."""
    gen = torch.Generator().manual_seed(5)
    feats, labels = _blobs(2000, gen)
    shifted = feats * torch.tensor([50.0, 0.01, 3.0, 1.0]) + 1000.0
    probe = fit_linear_probe(shifted, labels, n_classes=3)
    plain = fit_linear_probe(feats, labels, n_classes=3)
    assert (probe(shifted).argmax(dim=1) == labels).float().mean() > 0.95
    assert torch.equal(probe(shifted).argmax(dim=1), plain(feats).argmax(dim=1))
    # dense() on a [B, D, h, w] map is __call__ on each pixel's [D] embedding.
    maps = shifted[:24].reshape(2, 3, 4, 4).permute(0, 3, 1, 2)
    per_pixel = probe(maps.permute(0, 2, 3, 1).reshape(-1, 4)).reshape(2, 3, 4, 3)
    torch.testing.assert_close(probe.dense(maps), per_pixel.permute(0, 3, 1, 2))
    assert probe.n_classes == 3 and probe.weight.shape == (3, 4)
