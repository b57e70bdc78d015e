import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from maskrcnn.anchors import anchor_config_hash, anchor_grid, canvas_anchors, feature_sizes
from maskrcnn.config import AnchorConfig


def torchvision_anchors(canvas: int, config: AnchorConfig) -> torch.Tensor:
    generator = AnchorGenerator(
        tuple((s,) for s in config.sizes), (config.aspect_ratios,) * len(config.sizes)
    )
    images = ImageList(torch.zeros(1, 3, canvas, canvas), [(canvas, canvas)])
    features = [torch.zeros(1, 1, n, n) for n in feature_sizes(canvas)]
    return generator(images, features)[0]


@pytest.mark.parametrize("canvas", [64, 128, 1024])
def test_anchors_equal_torchvision(canvas):
    config = AnchorConfig()
    assert torch.equal(canvas_anchors(canvas, config), torchvision_anchors(canvas, config))


def test_custom_anchor_config_equal_torchvision():
    config = AnchorConfig(sizes=(16, 32, 64, 128, 256), aspect_ratios=(0.25, 1.0, 4.0))
    assert torch.equal(canvas_anchors(192, config), torchvision_anchors(192, config))


def test_grid_levels_line_up_with_anchors():
    grid = anchor_grid(256, AnchorConfig())
    assert grid.num_anchors == 3 * sum(n * n for n in feature_sizes(256))
    # The first anchor of each level is that level's cell anchors at shift (0, 0).
    for offset, cells in zip(grid.level_offsets, grid.cell_anchors, strict=True):
        assert torch.equal(grid.anchors[offset : offset + len(cells)], cells)


def test_canvas_must_be_multiple_of_64():
    with pytest.raises(ValueError, match="multiple of 64"):
        feature_sizes(100)


def test_hash_changes_with_anchor_config():
    base = anchor_config_hash(256, AnchorConfig())
    assert base == anchor_config_hash(256, AnchorConfig())
    assert base != anchor_config_hash(320, AnchorConfig())
    assert base != anchor_config_hash(256, AnchorConfig(aspect_ratios=(1.0,)))
    assert base != anchor_config_hash(256, AnchorConfig(), matching={"fg_iou_thresh": 0.6})
