"""The offline RPN targets against torchvision's Matcher + BoxCoder, the executable oracle."""

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.ops import box_iou

from maskrcnn.anchors import anchor_grid
from maskrcnn.config import AnchorConfig, RPNConfig
from maskrcnn.rpn_targets import RPNTargets, build_rpn_targets, sample_rpn_targets

GRID = anchor_grid(256, AnchorConfig())


def torchvision_targets(boxes: torch.Tensor) -> RPNTargets:
    """What torchvision's RPN assigns (labels 1 / 0 / -1 and deltas) as our sparse form."""
    anchors = GRID.anchors
    if len(boxes) == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return RPNTargets(empty, torch.zeros(0, 4), empty)
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(box_iou(boxes, anchors))
    pos = (matches >= 0).nonzero().squeeze(1)
    ignore = (matches == Matcher.BETWEEN_THRESHOLDS).nonzero().squeeze(1)
    deltas = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(boxes[matches[pos]], anchors[pos])
    return RPNTargets(pos, deltas, ignore)


def assert_same(ours: RPNTargets, expected: RPNTargets) -> None:
    assert torch.equal(ours.pos, expected.pos)
    assert torch.equal(ours.ignore, expected.ignore)
    torch.testing.assert_close(ours.pos_deltas, expected.pos_deltas, rtol=0, atol=1e-6)


def random_boxes(n: int, seed: int, max_side: float = 120.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 230
    wh = torch.rand(n, 2, generator=g) * max_side + 2
    return torch.cat([xy, (xy + wh).clamp(max=256)], dim=1)


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_torchvision(seed):
    boxes = random_boxes(1 + 3 * seed, seed)
    ours = build_rpn_targets(GRID, boxes)
    assert len(ours.pos) > 0
    assert_same(ours, torchvision_targets(boxes))


@pytest.mark.parametrize(
    "boxes",
    [
        pytest.param([[100.0, 100.0, 104.0, 103.0]], id="smaller-than-every-anchor"),
        pytest.param([[0.0, 0.0, 40.0, 60.0], [200.0, 190.0, 256.0, 256.0]], id="touching-border"),
        pytest.param([[0.0, 0.0, 256.0, 256.0]], id="whole-canvas"),
        pytest.param([[50.0, 50.0, 90.0, 90.0]] * 3 + [[52.0, 51.0, 91.0, 88.0]], id="duplicates"),
    ],
)
def test_edge_cases_match_torchvision(boxes):
    boxes = torch.tensor(boxes)
    ours = build_rpn_targets(GRID, boxes)
    assert len(ours.pos) > 0
    assert_same(ours, torchvision_targets(boxes))


def test_many_overlapping_boxes_match_torchvision():
    centre = torch.tensor([128.0, 128.0, 128.0, 128.0])
    offsets = torch.linspace(4, 100, 40)
    boxes = centre + torch.stack([-offsets, -offsets * 0.7, offsets * 0.9, offsets], dim=1)
    assert_same(build_rpn_targets(GRID, boxes), torchvision_targets(boxes))


def test_sparse_matcher_equals_dense_reference_at_canvas_1024():
    grid = anchor_grid(1024, AnchorConfig())
    boxes = random_boxes(30, seed=7, max_side=500.0) * 4
    boxes = boxes.clamp(max=1024)
    sparse = build_rpn_targets(grid, boxes)
    dense = build_rpn_targets(grid, boxes, dense=True)
    assert len(sparse.pos) > 30
    assert_same(sparse, dense)


def test_no_ground_truth_gives_all_negative():
    targets = build_rpn_targets(GRID, torch.zeros(0, 4))
    assert len(targets.pos) == 0 and len(targets.ignore) == 0
    assert targets.pos_deltas.shape == (0, 4)


def test_crowd_never_positive_and_covered_anchors_ignored():
    crowd_box = torch.tensor([[20.0, 20.0, 140.0, 140.0]])
    targets = build_rpn_targets(GRID, crowd_box, torch.tensor([True]))
    assert len(targets.pos) == 0
    anchors = GRID.anchors
    inside = (
        (anchors[:, 0] >= 20)
        & (anchors[:, 1] >= 20)
        & (anchors[:, 2] <= 140)
        & (anchors[:, 3] <= 140)
    )
    ignored = torch.zeros(len(anchors), dtype=torch.bool)
    ignored[targets.ignore] = True
    assert inside.any() and ignored[inside].all()  # fully covered anchors: ignored
    far = anchors[:, 0] >= 150
    assert not ignored[far].any()  # anchors away from the crowd stay negative


def test_crowd_does_not_change_positives_of_other_boxes():
    box = torch.tensor([[150.0, 150.0, 230.0, 220.0]])
    crowd = torch.tensor([[10.0, 10.0, 100.0, 100.0]])
    alone = build_rpn_targets(GRID, box)
    both = build_rpn_targets(GRID, torch.cat([box, crowd]), torch.tensor([False, True]))
    assert torch.equal(alone.pos, both.pos)
    assert torch.equal(alone.pos_deltas, both.pos_deltas)
    assert set(alone.ignore.tolist()) < set(both.ignore.tolist())
    assert not set(both.ignore.tolist()) & set(both.pos.tolist())


def test_iscrowd_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="iscrowd"):
        build_rpn_targets(GRID, torch.zeros(2, 4), torch.tensor([True]))


def test_sample_is_balanced_fresh_and_excludes_ignored():
    boxes = random_boxes(12, seed=3)
    targets = build_rpn_targets(GRID, boxes)
    g = torch.Generator().manual_seed(0)
    first = sample_rpn_targets(targets, GRID.num_anchors, generator=g)
    second = sample_rpn_targets(targets, GRID.num_anchors, generator=g)
    cfg = RPNConfig()
    for sample in (first, second):
        num_pos = int((sample.labels == 1).sum())
        assert num_pos == min(
            len(targets.pos), int(cfg.batch_size_per_image * cfg.positive_fraction)
        )
        assert int((sample.labels == 0).sum()) == cfg.batch_size_per_image - num_pos
        assert len(sample.idx.unique()) == cfg.batch_size_per_image
        neg = sample.idx[sample.labels == 0]
        excluded = set(targets.ignore.tolist()) | set(targets.pos.tolist())
        assert not set(neg.tolist()) & excluded
        pos_rows = {int(i): row for i, row in zip(targets.pos, targets.pos_deltas, strict=True)}
        for i, d in zip(
            sample.idx[sample.labels == 1], sample.deltas[sample.labels == 1], strict=True
        ):
            assert torch.equal(d, pos_rows[int(i)])
    assert not torch.equal(first.idx, second.idx)


def test_sample_pads_when_canvas_has_too_few_negatives():
    targets = RPNTargets(torch.tensor([0, 1]), torch.zeros(2, 4), torch.arange(2, 200))
    sample = sample_rpn_targets(targets, num_anchors=210, batch_size=256)
    assert int((sample.labels == 1).sum()) == 2
    assert int((sample.labels == 0).sum()) == 10
    assert int((sample.labels == -1).sum()) == 244


def test_sampled_negatives_are_uniform_over_the_negative_anchors():
    """Rejection sampling must not favour any negative anchor (nor ever pick an excluded one)."""
    targets = RPNTargets(torch.tensor([3, 40]), torch.zeros(2, 4), torch.arange(100, 150))
    num_anchors, draws = 400, 2000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(num_anchors)
    for _ in range(draws):
        sample = sample_rpn_targets(targets, num_anchors, batch_size=20, generator=g)
        negatives = sample.idx[sample.labels == 0]
        assert len(negatives.unique()) == 18
        counts[negatives] += 1
    excluded = torch.zeros(num_anchors, dtype=torch.bool)
    excluded[[3, 40, *range(100, 150)]] = True
    assert counts[excluded].sum() == 0
    expected = draws * 18 / int((~excluded).sum())  # ~103 picks per negative anchor
    chi2 = float(((counts[~excluded] - expected) ** 2 / expected).sum())
    dof = int((~excluded).sum()) - 1  # 347: chi2 has mean 347 and sd ~26 when uniform
    assert chi2 < dof + 5 * (2 * dof) ** 0.5
    # Low and high anchor indices are picked equally often: no bias from the order of draws.
    assert abs(counts[150:275].mean() - counts[275:].mean()) < 0.05 * expected
