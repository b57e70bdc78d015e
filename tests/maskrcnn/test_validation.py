"""Bad input at the model boundary raises ValueError naming the problem."""

from __future__ import annotations

import pytest
import torch

from maskrcnn import MaskRCNN


@pytest.fixture(scope="module")
def model(small_config, device):
    return MaskRCNN(small_config(canvas=64)).train().to(device)


def good_batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    target = {
        "boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, 64, 64, dtype=torch.uint8),
        "rpn_idx": torch.arange(256),
        "rpn_labels": torch.zeros(256),
        "rpn_deltas": torch.zeros(256, 4),
    }
    return torch.rand(2, 3, 64, 64), [target, {k: v.clone() for k, v in target.items()}]


def with_change(key: str, value) -> tuple[torch.Tensor, list]:
    images, targets = good_batch()
    targets[1][key] = value
    return images, targets


IMAGE_CASES = {
    "rank": (torch.rand(3, 64, 64), "rank 4"),
    "channels": (torch.rand(1, 1, 64, 64), r"\[B, 3, 64, 64\]"),
    "size": (torch.rand(1, 3, 128, 128), "canvas 64"),
    "dtype": (torch.zeros(1, 3, 64, 64, dtype=torch.int32), "float in \\[0, 1\\] or uint8"),
    "not a tensor": ([torch.rand(3, 64, 64)], "must be a tensor"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_images(model, case):
    images, message = IMAGE_CASES[case]
    with pytest.raises(ValueError, match=message):
        model(images, good_batch()[1])


def test_the_good_batch_passes(model, to_device):
    images, targets = to_device(*good_batch())
    assert set(model(images, targets)) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }


TARGET_CASES = {
    "boxes shape": (("boxes", torch.zeros(1, 5)), r"target 1: boxes must have shape \[N, 4\]"),
    "boxes dtype": (("boxes", torch.tensor([[4, 4, 30, 40]])), "boxes must be float"),
    "x2 < x1": (("boxes", torch.tensor([[30.0, 4.0, 4.0, 40.0]])), "target 1: .*x2 <= x1"),
    "y2 < y1": (("boxes", torch.tensor([[4.0, 40.0, 30.0, 4.0]])), "y2 <= y1"),
    "nan box": (("boxes", torch.tensor([[4.0, float("nan"), 30.0, 40.0]])), "NaN or inf"),
    "inf box": (("boxes", torch.tensor([[4.0, 4.0, float("inf"), 40.0]])), "NaN or inf"),
    "label 0": (("labels", torch.tensor([0])), r"labels must be in 1\.\.3"),
    "label too big": (("labels", torch.tensor([4])), r"labels must be in 1\.\.3"),
    "float labels": (("labels", torch.tensor([1.0])), "labels must be an integer"),
    "labels length": (("labels", torch.tensor([1, 2])), r"labels must have shape \[1\]"),
    "masks size": (("masks", torch.ones(1, 32, 32)), r"masks must have shape \[1, 64, 64\]"),
    "masks count": (("masks", torch.ones(2, 64, 64)), r"masks must have shape \[1, 64, 64\]"),
    "rpn_idx range": (("rpn_idx", torch.arange(256) + 10_000), r"rpn_idx must be in 0\.\."),
    "rpn_labels shape": (("rpn_labels", torch.zeros(255)), r"rpn_labels must have shape \[256\]"),
    "rpn_deltas shape": (
        ("rpn_deltas", torch.zeros(256, 3)),
        r"rpn_deltas must have shape \[256, 4\]",
    ),
    "rpn_idx length": (
        ("rpn_idx", torch.arange(128)),
        r"rpn_labels must have shape \[128\]",
    ),
    "iscrowd shape": (("iscrowd", torch.zeros(3, dtype=torch.bool)), r"iscrowd must have shape"),
}


@pytest.mark.parametrize("case", sorted(TARGET_CASES))
def test_bad_targets(model, to_device, case):
    """On an accelerator the value checks are read back late (after the RPN's proposals): they
    must still raise before anything indexes with a bad label or anchor index."""
    (key, value), message = TARGET_CASES[case]
    images, targets = to_device(*with_change(key, value))
    with pytest.raises(ValueError, match=message):
        model(images, targets)


def test_target_count_must_match_the_batch(model):
    images, targets = good_batch()
    with pytest.raises(ValueError, match="got 1 targets for a batch of 2"):
        model(images, targets[:1])


def test_training_needs_targets(model):
    with pytest.raises(ValueError, match="training needs targets"):
        model(good_batch()[0])


def test_missing_keys_are_named(model):
    images, targets = good_batch()
    del targets[0]["masks"]
    with pytest.raises(ValueError, match=r"target 0 lacks \['masks'\]"):
        model(images, targets)


def test_rpn_sample_must_be_complete_and_on_every_image(model):
    images, targets = good_batch()
    del targets[1]["rpn_deltas"]
    with pytest.raises(ValueError, match="needs all of"):
        model(images, targets)
    for key in ("rpn_idx", "rpn_labels"):
        del targets[1][key]
    with pytest.raises(ValueError, match="either every target or none"):
        model(images, targets)
