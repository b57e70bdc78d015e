"""Multi-scale shards: per-scale RPN targets equal torchvision's matching on the resized boxes,
and the loader's image, boxes, masks and targets agree at whichever scale it draws."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from split_writing import write_split
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.ops import box_iou

from maskrcnn.anchors import anchor_grid
from maskrcnn.config import ModelConfig
from maskrcnn.roi_heads import mask_targets
from pipeline.coco.masks import masks_to_boxes
from pipeline.coco.reader import instance_masks, read_coco
from pipeline.shards.preprocess import encode_record
from pipeline.shards.schema import rows_to_table, shard_files, shard_metadata
from pipeline.training.batch import mask_crop_size
from pipeline.training.loader import decode_batch, iter_batches

CONFIG = ModelConfig(num_classes=6, canvas=128)
S = CONFIG.canvas
GRID = anchor_grid(S, CONFIG.anchors)
SCALES = (0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def split(shapes_dataset, tmp_path_factory):
    """The synthetic train split with targets at three scales (written without Ray)."""
    root, summary = shapes_dataset
    train = summary["train"]
    index = read_coco(root / train["annotation_file"], root / train["images_dir"])
    metadata = shard_metadata(
        model_config=CONFIG,
        categories=index.categories,
        annotation_sha256=index.sha256,
        split="train",
        image_format="png",
        train_scales=SCALES,
    )
    rows = [
        encode_record(
            r, model_config=CONFIG, image_format="png", jpeg_quality=95, train_scales=SCALES
        )
        for r in index.records
    ]
    out = tmp_path_factory.mktemp("multiscale") / "train"
    write_split(out, rows_to_table(rows), metadata, rows_per_shard=16, counts={"images": len(rows)})
    filesystem, paths = shard_files(out)
    return out, pq.read_table(paths[0], filesystem=filesystem), index.records


def _torchvision(boxes: torch.Tensor) -> tuple[list[int], torch.Tensor, list[int]]:
    """torchvision's RPN assignment (Matcher + BoxCoder) as positive indices, deltas, ignored."""
    if len(boxes) == 0:
        return [], torch.zeros(0, 4), []
    rpn = CONFIG.rpn
    matcher = Matcher(rpn.fg_iou_thresh, rpn.bg_iou_thresh, allow_low_quality_matches=True)
    matches = matcher(box_iou(boxes, GRID.anchors))
    pos = (matches >= 0).nonzero().squeeze(1)
    ignore = (matches == Matcher.BETWEEN_THRESHOLDS).nonzero().squeeze(1)
    deltas = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(boxes[matches[pos]], GRID.anchors[pos])
    return pos.tolist(), deltas, ignore.tolist()


def test_each_scales_targets_equal_torchvision_on_the_resized_boxes(split):
    _, table, records = split
    compared = 0
    for row, record in zip(table.to_pylist(), records, strict=True):
        if any(i.iscrowd for i in record.instances):
            continue  # torchvision has no crowd regions
        longer = max(record.height, record.width)
        for k, factor in enumerate(SCALES):
            scale = round(factor * S) / longer
            h, w = max(1, round(record.height * scale)), max(1, round(record.width * scale))
            assert max(h, w) == round(factor * S)
            assert row["target_scales"][k] == pytest.approx(scale, rel=1e-6)
            bbox = np.array([i.bbox for i in record.instances], np.float64).reshape(-1, 4)
            factors = np.array([w / record.width, h / record.height] * 2)
            boxes = torch.from_numpy(bbox * factors).float()
            flipped = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
            for prefix, b in (("rpn_", boxes), ("rpn_flip_", flipped)):
                pos, deltas, ignore = _torchvision(b)
                assert row[prefix + "pos"][k] == pos and row[prefix + "ignore"][k] == ignore
                stored = torch.tensor(row[prefix + "pos_deltas"][k]).reshape(-1, 4)
                torch.testing.assert_close(stored, deltas, rtol=0, atol=1e-5)
                compared += len(pos) > 0
    assert compared >= 10


def _decode(table, seed, flip_prob=0.0, crop_size=None):
    generator = torch.Generator().manual_seed(seed)
    return decode_batch(
        table,
        canvas=S,
        num_anchors=GRID.num_anchors,
        flip_prob=flip_prob,
        generator=generator,
        crop_size=crop_size,
    )


def _drawn_scale(row, image) -> int:
    """Which stored scale the loader used, from the pasted image's extent."""
    sizes = [
        (max(1, round(row["height"] * s)), max(1, round(row["width"] * s)))
        for s in row["target_scales"]
    ]
    filled = image.sum(0) > 0
    extent = (int(filled.any(1).nonzero().max()) + 1, int(filled.any(0).nonzero().max()) + 1)
    assert extent in sizes, (extent, sizes)
    return sizes.index(extent), sizes[sizes.index(extent)]


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_image_boxes_masks_and_targets_line_up_at_every_scale(split, flip_prob):
    _, table, _ = split
    drawn: Counter[int] = Counter()
    for seed in range(8):
        images, targets = _decode(table, seed, flip_prob)
        for row, image, target in zip(table.to_pylist(), images, targets, strict=True):
            k, (h, w) = _drawn_scale(row, image)
            drawn[k] += 1
            boxes, masks = target["boxes"].numpy(), target["masks"].numpy()
            assert (
                masks.shape[1:] == (S, S) and not masks[:, h:].any() and not masks[:, :, w:].any()
            )
            for box, mask_box, mask in zip(boxes, masks_to_boxes(masks), masks, strict=True):
                if mask.any():  # a mask decoded at this scale covers its box (up to a pixel)
                    np.testing.assert_allclose(mask_box, box, atol=1.5 + row["target_scales"][k])
            prefix = "rpn_flip_" if flip_prob else "rpn_"
            idx, labels = target["rpn_idx"], target["rpn_labels"]
            assert set(idx[labels == 1].tolist()) <= set(row[prefix + "pos"][k])
            assert not set(idx[labels == 0].tolist()) & set(row[prefix + "ignore"][k])
    # Uniform over three scales: 128 draws, each count within 4.5 sigma of 42.7.
    assert set(drawn) == {0, 1, 2} and all(18 <= n <= 68 for n in drawn.values()), drawn


def test_mask_targets_at_every_scale_match_the_annotation_rasterised_there(split):
    """Both mask forms the loader gives at a drawn scale (canvas masks; the mask crops the
    training collate ships) train the mask head as the annotation rasterised at that scale
    would: 28 x 28 targets on the gt boxes, mean |difference| and share of equal binarised
    pixels over all images (each form resamples the stored crop by nearest neighbour)."""
    _, table, records = split
    errors: dict[str, list[tuple[float, float]]] = {"masks": [], "mask_crops": []}
    for seed in range(6):
        images, canvas = _decode(table, seed)
        _, crops = _decode(table, seed, crop_size=mask_crop_size(CONFIG))
        for row, record, image, plain, cropped in zip(
            table.to_pylist(), records, images, canvas, crops, strict=True
        ):
            if not len(plain["boxes"]):
                continue
            k, _ = _drawn_scale(row, image)
            kept = [not i.iscrowd for i in record.instances]
            exact = instance_masks(record, scale=row["target_scales"][k])[kept]
            truth = torch.zeros((len(exact), S, S), dtype=torch.uint8)
            truth[:, : exact.shape[1], : exact.shape[2]] = torch.from_numpy(exact)
            boxes, matched = plain["boxes"], torch.arange(len(plain["boxes"]))
            want = mask_targets([truth], [boxes], [matched], 28)
            forms = {
                "masks": plain["masks"],
                "mask_crops": (cropped["mask_crops"], cropped["mask_boxes"]),
            }
            for name, masks in forms.items():
                got = mask_targets([masks], [boxes], [matched], 28)
                same = ((got >= 0.5) == (want >= 0.5)).float().mean()
                errors[name].append((float((got - want).abs().mean()), float(same)))
    mean = {name: np.mean(values, axis=0) for name, values in errors.items()}
    assert len(errors["masks"]) >= 64, len(errors["masks"])
    assert mean["masks"][0] < 0.035 and mean["masks"][1] >= 0.96, mean
    assert mean["mask_crops"][0] < 0.062 and mean["mask_crops"][1] >= 0.94, mean


def test_shards_with_other_scales_are_an_error_at_train_time(split):
    out, _, _ = split
    with pytest.raises(ValueError, match=r"train_scales \[0.5, 0.75, 1.0\].*asks for \[1.0\]"):
        next(iter_batches(out, batch_size=2, model_config=CONFIG, train_scales=(1.0,)))
    batch = next(iter_batches(out, batch_size=2, model_config=CONFIG, train_scales=SCALES))
    assert batch[0].shape == (2, 3, S, S)
