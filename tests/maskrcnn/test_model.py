"""The model's contract: five losses in training, torchvision's output format in eval, configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn import MaskRCNN
from maskrcnn.backbone import FrozenBatchNorm2d as FrozenBN
from maskrcnn.backbone import build_backbone
from maskrcnn.roi_heads import mask_loss, mask_targets

LOSS_NAMES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def test_training_returns_five_finite_losses_from_the_precomputed_sample(small_config, toy_batch):
    config = small_config()
    images, targets = toy_batch(config)
    losses = MaskRCNN(config).train()(images, targets)
    assert set(losses) == LOSS_NAMES
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert all(v.item() > 0 for v in losses.values())


def test_without_rpn_keys_the_sample_is_built_online(small_config, toy_batch):
    config = small_config()
    images, targets = toy_batch(config)
    plain = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
    torch.manual_seed(0)
    model = MaskRCNN(config).train()
    online = model(images, plain)
    precomputed = model(images, targets)
    assert set(online) == LOSS_NAMES
    assert all(torch.isfinite(v) for v in online.values())
    # Both samples hold every positive anchor (there are fewer than 128) and 256 anchors, so the
    # box regression loss of the RPN is the same whichever negatives were drawn.
    torch.testing.assert_close(online["loss_rpn_box_reg"], precomputed["loss_rpn_box_reg"])


def _with_crowd(target: dict, box: list[float], crowd: bool) -> dict:
    s = target["masks"].shape[-1]
    return {
        **target,
        "boxes": torch.cat([target["boxes"], torch.tensor([box])]),
        "labels": torch.cat([target["labels"], torch.tensor([1])]),
        "masks": torch.cat([target["masks"], torch.zeros(1, s, s, dtype=torch.uint8)]),
        "iscrowd": torch.tensor([False] * len(target["boxes"]) + [crowd]),
    }


def test_crowd_instances_are_left_out_of_the_roi_heads(small_config, toy_batch):
    config = small_config()
    images, targets = toy_batch(config)
    box = [0.0, 90.0, 40.0, 127.0]
    model = MaskRCNN(config).train()

    def losses(batch):
        torch.manual_seed(3)
        return model(images, batch)

    plain = losses(targets)
    crowd = losses([targets[0], _with_crowd(targets[1], box, crowd=True)])
    not_crowd = losses([targets[0], _with_crowd(targets[1], box, crowd=False)])
    for name in ("loss_classifier", "loss_box_reg", "loss_mask"):
        assert torch.equal(crowd[name], plain[name])
    assert not torch.equal(not_crowd["loss_mask"], plain["loss_mask"])


def test_online_rpn_sample_ignores_anchors_under_a_crowd_region(small_config, toy_batch):
    config = small_config()
    _, targets = toy_batch(config)
    plain = {k: targets[1][k] for k in ("boxes", "labels", "masks")}
    box = [0.0, 80.0, 48.0, 128.0]
    rpn = MaskRCNN(config).rpn
    anchors = rpn.grid.anchors
    inside = (anchors[:, :2] >= torch.tensor(box[:2])).all(1) & (
        anchors[:, 2:] <= torch.tensor(box[2:])
    ).all(1)

    def negatives_inside(crowd: bool) -> int:
        torch.manual_seed(0)
        sample = rpn.online_sample(_with_crowd(plain, box, crowd=crowd))
        return int(inside[sample.idx[sample.labels == 0]].sum())

    assert (
        negatives_inside(crowd=False) == 0
    )  # a real instance there makes them positive or ignored
    torch.manual_seed(0)
    background = rpn.online_sample(plain)
    assert int(inside[background.idx[background.labels == 0]].sum()) > 0
    assert negatives_inside(crowd=True) == 0


def test_overfits_a_tiny_batch(small_config, toy_batch):
    config = small_config()
    images, targets = toy_batch(config)
    torch.manual_seed(0)
    model = MaskRCNN(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    totals = []
    for _ in range(30):
        total = sum(model(images, targets).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    # Measured: the last five steps average about 0.15 of the first step's total.
    assert sum(totals[-5:]) / 5 < 0.3 * totals[0], totals


def test_eval_output_is_torchvisions_format(small_config, toy_batch):
    config = small_config()
    images, _ = toy_batch(config)
    with torch.no_grad():
        detections = MaskRCNN(config).eval()(images)
    assert len(detections) == len(images)
    s = config.canvas
    for det in detections:
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        n = len(det["boxes"])
        assert 0 < n <= config.roi.detections_per_img
        assert det["boxes"].shape == (n, 4) and det["labels"].dtype == torch.int64
        assert det["masks"].shape == (n, 1, s, s) and det["masks"].dtype == torch.float32
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= s
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())
        assert det["masks"].min() >= 0 and det["masks"].max() <= 1
        assert det["labels"].min() >= 1 and det["labels"].max() < config.num_classes


def test_uint8_images_are_scaled_like_float_images(small_config, toy_batch):
    config = small_config()
    images, _ = toy_batch(config)
    as_bytes = (images * 255).round().to(torch.uint8)
    model = MaskRCNN(config).eval()
    with torch.no_grad():
        from_bytes = model(as_bytes)
        from_floats = model(as_bytes.float() / 255)
    for a, b in zip(from_bytes, from_floats, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


@pytest.mark.parametrize(
    ("backbone", "norm", "norm_type", "channels"),
    [
        ("resnet18", "bn", nn.BatchNorm2d, [64, 128, 256, 512]),
        ("resnet34", "frozen_bn", FrozenBatchNorm2d, [64, 128, 256, 512]),
        ("resnet50", "gn", nn.GroupNorm, [256, 512, 1024, 2048]),
    ],
)
def test_backbones_and_norms(small_config, backbone, norm, norm_type, channels):
    config = small_config(backbone=backbone, norm=norm, canvas=64)
    net = build_backbone(config)
    fpn_in = [block[0].in_channels for block in net.fpn.inner_blocks]
    assert fpn_in == channels
    assert isinstance(net.body.bn1, norm_type)
    features = net(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features.values()] == [
        (config.fpn_channels, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)
    ]


def test_group_norm_uses_32_groups_or_fewer(small_config):
    body = build_backbone(small_config(backbone="resnet18", norm="gn")).body
    assert body.bn1.num_groups == 32 and body.bn1.num_channels == 64
    assert all(
        m.num_channels % m.num_groups == 0 for m in body.modules() if isinstance(m, nn.GroupNorm)
    )


def test_trainable_backbone_layers_freeze_the_lower_stages(small_config):
    body = build_backbone(small_config(trainable_backbone_layers=2)).body
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    everything = build_backbone(small_config(trainable_backbone_layers=5)).body
    assert all(p.requires_grad for p in everything.parameters())


def _frozen_bn_with_statistics(channels: int) -> FrozenBatchNorm2d:
    gen = torch.Generator().manual_seed(0)
    norm = FrozenBatchNorm2d(channels)
    norm.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
    norm.bias.copy_(torch.randn(channels, generator=gen))
    norm.running_mean.copy_(torch.randn(channels, generator=gen))
    norm.running_var.copy_(torch.rand(channels, generator=gen) + 0.1)
    return norm


def test_frozen_bn_computes_in_its_input_dtype_and_as_torchvision_in_float32():
    theirs = _frozen_bn_with_statistics(8)
    ours = FrozenBN(8)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(ours(x), theirs(x))
    half = x.bfloat16()
    assert theirs(half).dtype == torch.float32  # what kept the trunk in float32 under autocast
    assert ours(half).dtype == torch.bfloat16
    torch.testing.assert_close(ours(half).float(), theirs(half), rtol=2e-2, atol=2e-2)


def test_frozen_bn_backbone_stays_in_the_autocast_dtype(small_config):
    net = build_backbone(small_config(norm="frozen_bn", canvas=64)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.body.bn1(net.body.conv1(torch.rand(1, 3, 64, 64))).dtype == torch.bfloat16


def test_soft_mask_targets_reach_the_loss_in_float32():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 28, 28, generator=gen).bfloat16()
    labels = torch.tensor([1, 3, 2])
    targets = torch.rand(3, 28, 28, generator=gen)  # soft: RoIAlign of binary masks
    picked = logits[torch.arange(3), labels].float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(picked, targets)
    assert torch.equal(mask_loss(logits, labels, targets), expected)


def test_mask_targets_are_float32_under_autocast():
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[:, 10:40, 12:50] = 1
    boxes = torch.tensor([[8.3, 9.1, 41.7, 44.2], [11.0, 11.0, 30.0, 52.5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mask_targets([masks], [boxes], [torch.tensor([0, 1])], 28)
    assert got.dtype == torch.float32 and got.shape == (2, 28, 28)
    assert ((got > 0) & (got < 1)).any()  # soft edges survive


def test_training_under_bf16_autocast_gives_float32_losses(small_config, toy_batch):
    config = small_config(norm="frozen_bn")
    images, targets = toy_batch(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = MaskRCNN(config).train()(images, targets)
    assert set(losses) == LOSS_NAMES
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].dtype == torch.float32
