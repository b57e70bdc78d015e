"""Our model against torchvision's Mask R-CNN, the executable oracle, on the same S x S input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align

from maskrcnn import MaskRCNN, ModelConfig, RPNSample
from maskrcnn.box_ops import decode_boxes, encode_boxes
from maskrcnn.config import RoIConfig, RPNConfig
from maskrcnn.pooling import MultiLevelRoIAlign
from maskrcnn.roi_align_cpu import roi_align_fast_grad
from maskrcnn.rpn import rpn_loss

MIN_DETECTIONS = 20


def perturb(model: torch.nn.Module) -> None:
    """Make random weights give many varied detections: tame the ResNet's residual growth and
    spread the RPN and box-predictor outputs (their initialisation makes them nearly constant)."""
    with torch.no_grad():
        for name, module in model.backbone.body.named_modules():
            if name.endswith("bn3"):
                module.weight.mul_(0.3)
        model.rpn.head.cls_logits.weight.normal_(0, 1.0)
        model.rpn.head.bbox_pred.weight.normal_(0, 0.1)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 1.0)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.3)


def assert_same_detections(ours: list[dict[str, Tensor]], theirs: list[dict[str, Tensor]]) -> None:
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs, strict=True):
        assert len(ref["boxes"]) >= MIN_DETECTIONS
        assert len(mine["boxes"]) == len(ref["boxes"])
        assert torch.equal(mine["labels"], ref["labels"])
        torch.testing.assert_close(mine["boxes"], ref["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(mine["scores"], ref["scores"], rtol=0, atol=1e-5)
        assert mine["masks"].shape == ref["masks"].shape
        torch.testing.assert_close(mine["masks"], ref["masks"], rtol=0, atol=1e-4)


def test_resnet50_state_dict_loads_strictly_and_detections_match(device):
    """torchvision's own R50-FPN Mask R-CNN; fewer proposals and detections than the defaults
    (on both sides) only to keep the mask head's share of the test short."""
    canvas, num_classes, proposals, detections = 128, 5, 300, 30
    torch.manual_seed(0)
    theirs = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        min_size=canvas,
        max_size=canvas,
        rpn_post_nms_top_n_test=proposals,
        box_score_thresh=0.0,
        box_detections_per_img=detections,
    )
    perturb(theirs)
    config = ModelConfig(
        num_classes=num_classes,
        canvas=canvas,
        rpn=RPNConfig(post_nms_top_n_test=proposals),
        roi=RoIConfig(score_thresh=0.0, detections_per_img=detections),
    )
    ours = MaskRCNN(config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours, theirs = ours.to(device), theirs.to(device)
    image = torch.rand(1, 3, canvas, canvas, generator=torch.Generator().manual_seed(1))
    image = image.to(device)
    with torch.no_grad():
        expected = theirs.eval()(list(image))
        got = ours.eval()(image)
    assert_same_detections(got, expected)
    assert len(expected[0]["labels"].unique()) >= 2


def torchvision_twin(ours: MaskRCNN) -> TorchvisionMaskRCNN:
    """torchvision's MaskRCNN with the same backbone, head sizes, settings and weights."""
    cfg, roi = ours.config, ours.config.roi
    channels, last = cfg.fpn_channels, roi.mask_layers[-1]
    twin = TorchvisionMaskRCNN(
        copy.deepcopy(ours.backbone),
        min_size=cfg.canvas,
        max_size=cfg.canvas,
        rpn_head=RPNHead(channels, len(cfg.anchors.aspect_ratios)),
        rpn_pre_nms_top_n_train=cfg.rpn.pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn.post_nms_top_n_train,
        box_head=TwoMLPHead(channels * roi.box_pool_size**2, roi.representation_size),
        box_predictor=FastRCNNPredictor(roi.representation_size, cfg.num_classes),
        box_batch_size_per_image=roi.batch_size_per_image,
        box_score_thresh=roi.score_thresh,
        mask_head=MaskRCNNHeads(channels, list(roi.mask_layers), roi.mask_dilation),
        mask_predictor=MaskRCNNPredictor(last, last, cfg.num_classes),
    )
    twin.load_state_dict(ours.state_dict(), strict=True)
    # Its training-time resize draws a random size from a one-element list: skip the draw, so
    # that both models' proposal samplers see the same random stream.
    twin.transform.torch_choice = lambda sizes: sizes[0]
    return twin


class FixedAnchorSample:
    """Stands in for torchvision's RPN sampler: picks the anchors of our precomputed sample."""

    def __init__(self, targets: list[dict[str, Tensor]]) -> None:
        self.targets = targets

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pos, neg = [], []
        for image_labels, t in zip(labels, self.targets, strict=True):
            pos.append(torch.zeros_like(image_labels, dtype=torch.uint8))
            neg.append(torch.zeros_like(image_labels, dtype=torch.uint8))
            pos[-1][t["rpn_idx"][t["rpn_labels"] == 1]] = 1
            neg[-1][t["rpn_idx"][t["rpn_labels"] == 0]] = 1
        return pos, neg


def test_training_losses_match_torchvision_given_the_same_samples(
    small_config, toy_batch, to_device
):
    """Same anchor sample (ours precomputed, fed to torchvision's sampler) and the same RNG state
    for the proposal sampler: the five losses must agree, the empty image included."""
    config = small_config(norm="frozen_bn")
    torch.manual_seed(0)
    ours = MaskRCNN(config)
    perturb(ours)
    twin = torchvision_twin(ours)
    images, targets = toy_batch(config)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, config.canvas, config.canvas, dtype=torch.uint8),
    }
    empty_sample = {k: v for k, v in targets[0].items() if k.startswith("rpn_")}
    empty_sample["rpn_idx"] = torch.arange(256)
    empty_sample["rpn_labels"] = torch.zeros(256)
    empty_sample["rpn_deltas"] = torch.zeros(256, 4)
    images = torch.cat([images, images[:1]])
    targets = [*targets, {**empty, **empty_sample}]
    images, targets = to_device(images, targets)
    ours, twin = ours.to(images.device), twin.to(images.device)

    twin.rpn.fg_bg_sampler = FixedAnchorSample(targets)
    plain = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
    torch.manual_seed(7)
    expected = twin.train()(list(images), plain)
    torch.manual_seed(7)
    got = ours.train()(images, targets)
    assert set(got) == set(expected)
    for name in expected:
        assert expected[name].item() > 0
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    # And the gradients, through our RoIAlign backward among others.
    sum(expected.values()).backward()
    sum(got.values()).backward()
    theirs = dict(twin.named_parameters())
    for name in (
        "backbone.body.layer1.0.conv1.weight",
        "backbone.fpn.inner_blocks.0.0.weight",
        "rpn.head.conv.0.0.weight",
        "roi_heads.box_head.fc6.weight",
        "roi_heads.mask_head.0.0.weight",
    ):
        grad = dict(ours.named_parameters())[name].grad
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, theirs[name].grad, rtol=1e-3, atol=1e-6)


def test_batched_eval_matches_torchvision(small_config, toy_batch, device):
    config = small_config(
        norm="frozen_bn",
        roi=RoIConfig(score_thresh=0.0, representation_size=64, mask_layers=(32, 32)),
    )
    torch.manual_seed(0)
    ours = MaskRCNN(config)
    perturb(ours)
    twin = torchvision_twin(ours)
    images = toy_batch(config)[0].to(device)
    ours, twin = ours.to(device), twin.to(device)
    with torch.no_grad():
        assert_same_detections(ours.eval()(images), twin.eval()(list(images)))


def test_empty_images_give_zero_box_and_mask_losses_like_torchvision(small_config):
    config = small_config(norm="frozen_bn")
    ours = MaskRCNN(config)
    twin = torchvision_twin(ours)
    canvas = config.canvas
    images = torch.rand(2, 3, canvas, canvas)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, canvas, canvas, dtype=torch.uint8),
    }
    got = ours.train()(images, [empty, empty])
    expected = twin.train()(list(images), [empty, empty])
    for name in ("loss_rpn_box_reg", "loss_box_reg", "loss_mask"):
        assert expected[name].item() == 0.0
        assert got[name].item() == 0.0
    for name in ("loss_objectness", "loss_classifier"):
        assert torch.isfinite(got[name]) and got[name].item() > 0
    sum(got.values()).backward()
    assert ours.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None


def test_rpn_loss_equals_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    objectness = torch.randn(2, 50, generator=gen)
    deltas = torch.randn(2, 50, 4, generator=gen)
    idx = torch.stack([torch.randperm(50, generator=gen)[:8] for _ in range(2)])
    labels = torch.tensor(
        [[1, 1, 0, 0, 0, 0, -1, -1], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32
    )
    target = torch.randn(2, 8, 4, generator=gen) * (labels == 1)[..., None]
    obj_loss, box_loss = rpn_loss(objectness, deltas, RPNSample(idx, labels, target))

    bce, l1, sampled = 0.0, 0.0, 0
    for b in range(2):
        for k in range(8):
            if labels[b, k] < 0:
                continue
            sampled += 1
            x, y = float(objectness[b, idx[b, k]]), float(labels[b, k])
            bce += max(x, 0) - x * y + torch.log1p(torch.exp(-torch.tensor(abs(x)))).item()
            if y == 1:
                diff = (deltas[b, idx[b, k]] - target[b, k]).abs()
                l1 += torch.where(diff < 1 / 9, 0.5 * diff**2 * 9, diff - 0.5 / 9).sum().item()
    assert obj_loss.item() == pytest.approx(bce / sampled, rel=1e-5)
    assert box_loss.item() == pytest.approx(l1 / sampled, rel=1e-5)


def test_multilevel_roi_align_equals_torchvision():
    canvas, channels = 640, 2
    gen = torch.Generator().manual_seed(0)
    features = [
        torch.randn(2, channels, canvas // s, canvas // s, generator=gen) for s in (4, 8, 16, 32)
    ]
    side = torch.exp(torch.empty(2, 60, 1).uniform_(2, 6.35, generator=gen))  # 7 .. 570 px
    sizes = side * torch.empty(2, 60, 2).uniform_(0.8, 1.0, generator=gen)
    xy = torch.rand(2, 60, 2, generator=gen) * (canvas - sizes)
    boxes = list(torch.cat([xy, xy + sizes], dim=2))
    theirs = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = theirs({str(i): f for i, f in enumerate(features)}, boxes, [(canvas, canvas)] * 2)
    ours = MultiLevelRoIAlign(output_size=7, sampling_ratio=2)
    assert len(ours.levels(torch.cat(boxes)).unique()) == 4
    assert torch.equal(ours(features, boxes), expected)


def test_box_coding_equals_torchvision_box_coder():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(30, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 1 + torch.rand(30, 2, generator=gen) * 50], dim=1)
    targets = boxes + torch.randn(30, 4, generator=gen)
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights)
    assert torch.equal(encode_boxes(targets, boxes, weights), coder.encode_single(targets, boxes))
    deltas = torch.randn(30, 3, 4, generator=gen)
    expected = coder.decode_single(deltas.reshape(30, 12), boxes).reshape(30, 3, 4)
    assert torch.equal(decode_boxes(deltas, boxes, weights), expected)


@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_fast_roi_align_gradient_equals_torchvision(sampling_ratio):
    gen = torch.Generator().manual_seed(sampling_ratio)
    features = torch.randn(2, 5, 20, 28, generator=gen, requires_grad=True)
    xy = torch.rand(200, 2, generator=gen) * torch.tensor([28.0, 20.0]) * 4 * 1.2 - 10
    wh = torch.rand(200, 2, generator=gen) * 60  # some outside the map, some thinner than a cell
    rois = torch.cat([torch.randint(0, 2, (200, 1), generator=gen).float(), xy, xy + wh], dim=1)
    expected = roi_align(features, rois, (7, 7), 0.25, sampling_ratio)
    got = roi_align_fast_grad(features, rois, (7, 7), 0.25, sampling_ratio)
    assert torch.equal(got, expected)
    grad_output = torch.randn(expected.shape, generator=gen)
    (want,) = torch.autograd.grad(expected, features, grad_output)
    (have,) = torch.autograd.grad(got, features, grad_output)
    assert want.abs().max() > 1
    torch.testing.assert_close(have, want, rtol=0, atol=1e-5)
    (empty,) = torch.autograd.grad(
        roi_align_fast_grad(features, rois[:0], (7, 7), 0.25, 2).sum(), features
    )
    assert torch.equal(empty, torch.zeros_like(features))
