"""Loading torchvision and ImageNet weights, and our own save/load round trip."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18, resnet34
from torchvision.models.detection import maskrcnn_resnet50_fpn

from maskrcnn import (
    MaskRCNN,
    ModelConfig,
    load_imagenet_backbone,
    load_model,
    load_torchvision_maskrcnn,
    save_model,
)
from maskrcnn.checkpoints import read_model_info


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    """A torchvision maskrcnn_resnet50_fpn state dict with 91 classes, as its COCO checkpoint."""
    torch.manual_seed(0)
    theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path_factory.mktemp("weights") / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(theirs.state_dict(), path)
    return path


def test_torchvision_checkpoint_loads_every_tensor(coco_file, tmp_path):
    model = MaskRCNN(ModelConfig(num_classes=91, canvas=128))
    result = load_torchvision_maskrcnn(model, coco_file)
    state = torch.load(coco_file, weights_only=True)
    assert result.skipped == () and result.note == ""
    assert result.loaded == len(state)
    for key in (
        "backbone.body.layer3.2.conv2.weight",
        "rpn.head.bbox_pred.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.weight",
    ):
        assert torch.equal(model.state_dict()[key], state[key])
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": state, "epoch": 26}, wrapped)
    assert load_torchvision_maskrcnn(
        MaskRCNN(ModelConfig(num_classes=91, canvas=128)), wrapped
    ).loaded == len(state)


def test_other_class_count_keeps_only_the_shared_layers(coco_file):
    model = MaskRCNN(ModelConfig(num_classes=5, canvas=128))
    before = model.roi_heads.box_predictor.cls_score.weight.clone()
    result = load_torchvision_maskrcnn(model, coco_file)
    assert set(result.skipped) == {
        f"roi_heads.{name}.{kind}"
        for name in (
            "box_predictor.cls_score",
            "box_predictor.bbox_pred",
            "mask_predictor.mask_fcn_logits",
        )
        for kind in ("weight", "bias")
    }
    assert "num_classes differs (file 91, model 5)" in result.note
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, before)
    state = torch.load(coco_file, weights_only=True)
    assert torch.equal(model.roi_heads.box_head.fc6.weight, state["roi_heads.box_head.fc6.weight"])


def test_wrong_files_are_named_in_the_error(small_config, tmp_path):
    model = MaskRCNN(small_config())
    imagenet = tmp_path / "resnet18-imagenet.pth"
    torch.save(resnet18(weights=None).state_dict(), imagenet)
    with pytest.raises(
        ValueError, match=r"resnet18-imagenet\.pth is not a torchvision Mask R-CNN.*missing"
    ):
        load_torchvision_maskrcnn(model, imagenet)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth: not a torch checkpoint"):
        load_torchvision_maskrcnn(model, text)
    with pytest.raises(ValueError, match=r"absent\.pth: no such checkpoint file"):
        load_imagenet_backbone(model, tmp_path / "absent.pth")


def test_imagenet_backbone_loads_into_the_body(small_config, tmp_path):
    path = tmp_path / "resnet18-f37072fd.pth"
    state = resnet18(weights=None).state_dict()
    torch.save(state, path)
    model = MaskRCNN(small_config(norm="frozen_bn"))
    result = load_imagenet_backbone(model, path)
    assert set(result.skipped) == {"fc.weight", "fc.bias"}
    body = model.backbone.body.state_dict()
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        assert torch.equal(body[key], state[key])


def test_imagenet_backbone_into_group_norm_skips_running_statistics(small_config, tmp_path):
    path = tmp_path / "resnet18.pth"
    state = resnet18(weights=None).state_dict()
    with torch.no_grad():
        state["layer1.0.bn1.weight"].fill_(0.5)
    torch.save(state, path)
    model = MaskRCNN(small_config(norm="gn"))
    result = load_imagenet_backbone(model, path)
    assert "layer1.0.bn1.running_mean" in result.skipped
    assert "GroupNorm" in result.note
    assert torch.equal(model.backbone.body.layer1[0].bn1.weight, state["layer1.0.bn1.weight"])


def test_imagenet_backbone_of_another_depth_is_refused(small_config, tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(resnet34(weights=None).state_dict(), path)
    with pytest.raises(
        ValueError, match=r"resnet34\.pth is not an ImageNet resnet18 .*unexpected.*layer1\.2"
    ):
        load_imagenet_backbone(MaskRCNN(small_config()), path)


def test_save_and_load_round_trip(small_config, toy_batch, tmp_path):
    config = small_config(num_classes=3)
    torch.manual_seed(0)
    model = MaskRCNN(config).eval()
    path = tmp_path / "nested" / "model.pt"
    save_model(model, path)
    restored = load_model(path).eval()
    assert restored.config == config
    images, _ = toy_batch(config)
    with torch.no_grad():
        for a, b in zip(model(images), restored(images), strict=True):
            assert len(a["boxes"]) > 0
            assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "state_dict": {}}, other)
    with pytest.raises(ValueError, match=r"other\.pt: not a maskrcnn-pipeline/1 model file"):
        load_model(other)


def test_the_model_file_carries_its_categories(small_config, tmp_path):
    config = small_config(num_classes=3)
    model = MaskRCNN(config)
    categories = [{"id": 4, "name": "circle", "label": 1}, {"id": 9, "name": "square", "label": 2}]
    path = tmp_path / "model.pt"
    save_model(model, path, categories=categories)
    assert read_model_info(path) == (config, categories)
    assert load_model(path).config == config  # the extra entry does not disturb loading
    save_model(model, path)
    assert read_model_info(path) == (config, None)
    with pytest.raises(ValueError, match=r"model\.pt: category 1 has label 3, outside 1\.\.2"):
        save_model(model, path, categories=[categories[0], {**categories[1], "label": 3}])
    with pytest.raises(ValueError, match=r"model\.pt: category 0 .* needs an int id"):
        save_model(model, path, categories=[{"id": 4, "label": 1}])
    with pytest.raises(ValueError, match=r"other\.pt: not a maskrcnn-pipeline/1 model file"):
        torch.save({"format": "something-else"}, tmp_path / "other.pt")
        read_model_info(tmp_path / "other.pt")
