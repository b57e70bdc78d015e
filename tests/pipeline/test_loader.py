"""The shard loader: model inputs as docs/design.md says, flips, fresh RPN samples, Ray Data."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from ray.data.collate_fn import ArrowBatchCollateFn
from split_writing import write_split

from maskrcnn.anchors import anchor_grid
from maskrcnn.config import ModelConfig
from maskrcnn.roi_heads import mask_targets
from pipeline.coco.masks import masks_to_boxes
from pipeline.coco.reader import instance_masks, read_coco
from pipeline.shards.preprocess import encode_record
from pipeline.shards.schema import rows_to_table, shard_files, shard_metadata
from pipeline.training.batch import mask_crop_size, pack_batch, to_device, unpack_batch
from pipeline.training.loader import decode_batch, iter_batches, make_collate_fn

CONFIG = ModelConfig(num_classes=6, canvas=128)
S = CONFIG.canvas
NUM_ANCHORS = anchor_grid(S, CONFIG.anchors).num_anchors


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split(shapes_dataset, tmp_path_factory):
    """The synthetic train split as shards (written without Ray), and its COCO records."""
    root, summary = shapes_dataset
    index = read_coco(
        root / summary["train"]["annotation_file"], root / summary["train"]["images_dir"]
    )
    out = tmp_path_factory.mktemp("loader") / "train"
    metadata = shard_metadata(
        model_config=CONFIG,
        categories=index.categories,
        annotation_sha256=index.sha256,
        split="train",
        image_format="png",
    )
    rows = [
        encode_record(record, model_config=CONFIG, image_format="png", jpeg_quality=95)
        for record in index.records
    ]
    counts = {"images": len(rows)}
    write_split(out, rows_to_table(rows), metadata, rows_per_shard=6, counts=counts)
    return out, {r.image_id: r for r in index.records}


@pytest.fixture(scope="module")
def table(split):
    filesystem, paths = shard_files(split[0])
    return pq.read_table(paths[0], filesystem=filesystem)


def _decode(batch, *, flip_prob=0.0, seed=0, crop_size=None):
    generator = torch.Generator().manual_seed(seed)
    return decode_batch(
        batch,
        canvas=S,
        num_anchors=NUM_ANCHORS,
        flip_prob=flip_prob,
        generator=generator,
        crop_size=crop_size,
    )


def test_batch_matches_the_model_input_contract(table, split):
    images, targets = _decode(table)
    assert images.dtype == torch.uint8 and images.shape == (table.num_rows, 3, S, S)
    for i, row in enumerate(table.to_pylist()):
        record = split[1][row["image_id"]]
        pixels = np.array(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        h, w = pixels.shape[:2]
        assert torch.equal(images[i, :, :h, :w], torch.from_numpy(pixels).permute(2, 0, 1))
        assert images[i, :, h:].sum() == 0 and images[i, :, :, w:].sum() == 0
        target = targets[i]
        keep = ~np.array(row["iscrowd"], dtype=bool)
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (keep.sum(), 4)
        np.testing.assert_array_equal(target["boxes"], np.array(row["boxes"]).reshape(-1, 4)[keep])
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == np.array(row["labels"])[keep].tolist()
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (keep.sum(), S, S)
        expected = instance_masks(record, scale=row["scale"])[keep]
        assert torch.equal(target["masks"][:, :h, :w], torch.from_numpy(expected))
        assert target["masks"][:, h:].sum() == 0 and target["masks"][:, :, w:].sum() == 0
        rpn = {
            k: (target[k].dtype, tuple(target[k].shape))
            for k in ("rpn_idx", "rpn_labels", "rpn_deltas")
        }
        assert rpn == {
            "rpn_idx": (torch.int64, (256,)),
            "rpn_labels": (torch.float32, (256,)),
            "rpn_deltas": (torch.float32, (256, 4)),
        }
    assert any(any(r) for r in table["iscrowd"].to_pylist()), "the fixture should hold a crowd"


def _check_rpn_sample(target, pos, deltas, ignore):
    labels, idx = target["rpn_labels"], target["rpn_idx"]
    positives = idx[labels == 1].tolist()
    assert set(positives) <= set(pos) and len(positives) == min(len(pos), 128)
    assert not set(idx[labels == 0].tolist()) & (set(pos) | set(ignore))
    assert (labels >= 0).sum() == 256
    lookup = {a: d for a, d in zip(pos, deltas, strict=True)}
    for anchor, delta in zip(positives, target["rpn_deltas"][labels == 1], strict=True):
        np.testing.assert_allclose(delta, lookup[anchor], rtol=0, atol=1e-6)


def _same_samples(first, second) -> bool:
    pairs = zip(first, second, strict=True)
    return all(torch.equal(a["rpn_idx"], b["rpn_idx"]) for a, b in pairs)


def test_rpn_sample_comes_from_the_stored_pools_and_is_fresh(table):
    _, first = _decode(table, seed=1)
    _, second = _decode(table, seed=2)
    rows = table.to_pylist()
    for row, target in zip(rows, first, strict=True):
        stored = (row["rpn_pos"][0], row["rpn_pos_deltas"][0], row["rpn_ignore"][0])
        _check_rpn_sample(target, *stored)
    assert not _same_samples(first, second)


def test_flip_mirrors_image_masks_boxes_within_the_image_width(table):
    plain_images, plain = _decode(table)
    images, targets = _decode(table, flip_prob=1.0)
    for i, row in enumerate(table.to_pylist()):
        w = Image.open(io.BytesIO(row["image"])).width
        assert torch.equal(images[i, :, :, :w], plain_images[i, :, :, :w].flip(-1))
        assert torch.equal(targets[i]["masks"][:, :, :w], plain[i]["masks"][:, :, :w].flip(-1))
        x1, y1, x2, y2 = plain[i]["boxes"].unbind(1)
        mirrored = torch.stack([w - x2, y1, w - x1, y2], 1)
        torch.testing.assert_close(targets[i]["boxes"], mirrored, rtol=0, atol=1e-5)
        mask_boxes = masks_to_boxes(plain[i]["masks"].numpy())
        mask_boxes[:, [0, 2]] = w - mask_boxes[:, [2, 0]]
        np.testing.assert_array_equal(masks_to_boxes(targets[i]["masks"].numpy()), mask_boxes)
        names = ("rpn_flip_pos", "rpn_flip_pos_deltas", "rpn_flip_ignore")
        _check_rpn_sample(targets[i], *(row[name][0] for name in names))


def test_numpy_batches_as_ray_gives_them_decode_like_arrow(table):
    numpy_batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    images_a, targets_a = _decode(table, flip_prob=0.5, seed=4)
    images_b, targets_b = _decode(numpy_batch, flip_prob=0.5, seed=4)
    assert torch.equal(images_a, images_b)
    for a, b in zip(targets_a, targets_b, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_iterator_covers_every_image_once_in_a_seeded_order(split):
    out, records = split

    def order(seed):
        batches = list(
            iter_batches(out, batch_size=5, model_config=CONFIG, shuffle=True, seed=seed)
        )
        assert [len(t) for _, t in batches] == [5, 5, 5, 1]
        return [tuple(t["boxes"].flatten().tolist()) for _, ts in batches for t in ts]

    first = order(0)
    assert len(first) == len(records)
    assert order(0) == first and order(1) != first
    assert sorted(first) == sorted(order(1))


def test_shards_for_another_canvas_are_refused(split):
    other = ModelConfig(num_classes=6, canvas=192)
    with pytest.raises(ValueError, match=rf"{split[0]}.*canvas 128.*canvas 192"):
        next(iter_batches(split[0], batch_size=2, model_config=other))


def test_collate_fn_pickles_and_decodes_arrow_batches_as_ray_passes_them(table):
    collate, twin = (
        pickle.loads(pickle.dumps(make_collate_fn(CONFIG, flip_prob=0.5, seed=7))) for _ in "ab"
    )
    assert isinstance(collate, ArrowBatchCollateFn)  # so iter_torch_batches hands it Arrow
    images, targets = unpack_batch(collate(table))
    twin_images, twin_targets = unpack_batch(twin(table))
    assert torch.equal(images, twin_images) and _same_samples(targets, twin_targets)
    plain, _ = _decode(table)
    calls = [images] + [collate(table)["images"] for _ in range(3)]
    flipped = [not torch.equal(a, b) for batch in calls for a, b in zip(batch, plain, strict=True)]
    assert 0.2 < sum(flipped) / len(flipped) < 0.8  # flip_prob=0.5, drawn per image
    _, following = unpack_batch(collate(table))  # the next call draws new samples
    assert not _same_samples(targets, following)


def test_the_collate_returns_a_flat_dict_of_tensors_that_unpacks_to_the_targets(table):
    collate = make_collate_fn(CONFIG, flip_prob=0.5, seed=3)
    packed = collate(table)
    assert all(isinstance(v, torch.Tensor) for v in packed.values())  # Ray pins and moves these
    size = mask_crop_size(CONFIG)
    crops = packed["mask_crops"]
    assert crops.dtype == torch.uint8 and crops.shape[1:] == (size, size)
    assert "masks" not in packed  # no full-canvas masks in the batch
    images, targets = unpack_batch(to_device(packed, torch.device("cpu")))
    # The same draws through decode_batch: the collate's generator for its first call.
    state = np.random.SeedSequence([3, 0]).generate_state(1)
    expected_images, expected = _decode_as_collate(table, collate, int(state[0]))
    assert torch.equal(images, expected_images) and len(targets) == len(expected)
    for got, want in zip(targets, expected, strict=True):
        assert got.keys() == want.keys()
        for key in ("boxes", "labels", "rpn_idx", "rpn_labels", "rpn_deltas", "mask_boxes"):
            assert torch.equal(got[key], want[key]), key
        assert torch.equal(got["mask_crops"], want["mask_crops"])


def _decode_as_collate(table, collate, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return decode_batch(table, generator=generator, **collate.decode)


def test_a_packed_batch_pins_only_for_cuda_and_round_trips(table):
    images, targets = _decode(table, flip_prob=0.5, crop_size=56)
    packed = pack_batch(images, targets)
    assert not any(v.is_pinned() for v in packed.values())
    back_images, back = unpack_batch(packed)
    assert torch.equal(back_images, images)
    for got, want in zip(back, targets, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if torch.cuda.is_available():
        pinned = pack_batch(images, targets, pin_memory=True)
        assert all(v.is_pinned() for k, v in pinned.items() if k != "counts")


def test_crop_mask_targets_match_the_canvas_mask_targets_of_the_same_rows(table):
    """The model's mask targets from the shipped crops equal those from full-canvas masks
    (mean |difference| under 0.03, 97% of binarised pixels equal) for proposals near the gt."""
    _, canvas = _decode(table, flip_prob=0.5, seed=1)
    _, crops = _decode(table, flip_prob=0.5, seed=1, crop_size=mask_crop_size(CONFIG))
    gen = torch.Generator().manual_seed(0)
    for plain, cropped in zip(canvas, crops, strict=True):
        boxes = plain["boxes"]
        if not len(boxes):
            continue
        matched = torch.arange(len(boxes)).repeat_interleave(4)
        side = (boxes[matched, 2:] - boxes[matched, :2]).repeat(1, 2)
        jitter = (torch.rand(len(matched), 4, generator=gen) * 2 - 1) * 0.1 * side
        proposals = (boxes[matched] + jitter).clamp(0, S - 1)
        want = mask_targets([plain["masks"]], [proposals], [matched], 28)
        pair = (cropped["mask_crops"], cropped["mask_boxes"])
        got = mask_targets([pair], [proposals], [matched], 28)
        assert (got - want).abs().mean() < 0.03
        assert ((got >= 0.5) == (want >= 0.5)).float().mean() >= 0.97
