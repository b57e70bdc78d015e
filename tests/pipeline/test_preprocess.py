"""The preprocess stage on Ray Data: the shard contract, skips, determinism and atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from maskrcnn.anchors import anchor_grid
from maskrcnn.config import ModelConfig
from maskrcnn.rpn_targets import build_rpn_targets
from pipeline.coco.masks import decode_rle, masks_to_boxes
from pipeline.coco.reader import DataError
from pipeline.io import storage
from pipeline.shards import schema as shards
from pipeline.shards import writer as shard_writer
from pipeline.shards.preprocess import preprocess_split
from pipeline.shards.schema import read_manifest, shard_files
from pipeline.training.batch import mask_crop_size, unpack_batch
from pipeline.training.loader import iter_batches, make_collate_fn, ray_dataset

CONFIG = ModelConfig(num_classes=6, canvas=128)
BOXES = pa.list_(pa.list_(pa.float32(), 4))
CONTRACT = {  # ARCHITECTURE.md, "Shard format (contract)"
    "image_id": pa.int64(),
    "file_name": pa.string(),
    "height": pa.int32(),
    "width": pa.int32(),
    "scale": pa.float32(),
    "image": pa.binary(),
    "boxes": BOXES,
    "labels": pa.list_(pa.int32()),
    "iscrowd": pa.list_(pa.bool_()),
    "masks": pa.list_(pa.binary()),
    # one list per training scale (format 2, docs/design.md "Shards")
    "rpn_pos": pa.list_(pa.list_(pa.int32())),
    "rpn_pos_deltas": pa.list_(BOXES),
    "rpn_ignore": pa.list_(pa.list_(pa.int32())),
}
EXTRA = {  # the flipped RPN targets (docs/design.md) and the loader's in-box mask crops
    "rpn_flip_pos": pa.list_(pa.list_(pa.int32())),
    "rpn_flip_pos_deltas": pa.list_(BOXES),
    "rpn_flip_ignore": pa.list_(pa.list_(pa.int32())),
    "target_scales": pa.list_(pa.float32()),
    "mask_crop_boxes": pa.list_(pa.list_(pa.int32(), 4)),
    "mask_crops": pa.list_(pa.binary()),
}


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _preprocess(source, out_dir, **kwargs) -> dict:
    return preprocess_split(
        annotation_file=source["annotation_file"],
        images_dir=source["images_dir"],
        out_dir=out_dir,
        model_config=kwargs.pop("model_config", CONFIG),
        rows_per_shard=kwargs.pop("rows_per_shard", 5),
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def source(shapes_dataset) -> dict:
    root, summary = shapes_dataset
    train = summary["train"]
    return {
        **train,
        "annotation_file": root / train["annotation_file"],
        "images_dir": root / train["images_dir"],
    }


@pytest.fixture(scope="module")
def train_split(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "train"
    return out, _preprocess(source, out)


def test_plain_pyarrow_reads_the_contract_schema_and_metadata(train_split, source):
    out, manifest = train_split
    dataset = pq.ParquetDataset(sorted(out.glob("part-*.parquet")))
    schema = dataset.schema
    assert {name: schema.field(name).type for name in schema.names} == {**CONTRACT, **EXTRA}
    assert schema.names[: len(CONTRACT)] == list(CONTRACT)
    table = dataset.read()
    assert table["image_id"].to_pylist() == sorted(table["image_id"].to_pylist())
    metadata = json.loads(schema.metadata[b"maskrcnn"])
    digest = hashlib.sha256(source["annotation_file"].read_bytes()).hexdigest()
    assert metadata["annotation_sha256"] == digest
    assert metadata["canvas"] == 128 and metadata["split"] == "train"
    assert metadata["anchor_config_hash"] == shards.model_anchor_hash(CONFIG)
    assert metadata["num_anchors"] == anchor_grid(128, CONFIG.anchors).num_anchors
    original = json.loads(source["annotation_file"].read_text())["categories"]
    assert [(c["id"], c["name"]) for c in metadata["categories"]] == sorted(
        (c["id"], c["name"]) for c in original
    )
    assert [c["label"] for c in metadata["categories"]] == list(range(1, len(original) + 1))
    assert {k: manifest[k] for k in metadata} == metadata
    counts = manifest["counts"]
    assert (counts["images"], counts["instances"], counts["crowd"], counts["skipped"]) == (
        source["images"],
        source["instances"],
        source["crowd"],
        [],
    )
    assert table.num_rows == source["images"] and counts["shards"] == 4


def test_rows_hold_the_resized_image_masks_boxes_and_both_rpn_targets(train_split):
    out, _ = train_split
    grid = anchor_grid(128, CONFIG.anchors)
    for row in pq.read_table(out / "part-00001.parquet").to_pylist():
        image = Image.open(io.BytesIO(row["image"]))
        h, w = (round(row["height"] * row["scale"]), round(row["width"] * row["scale"]))
        assert (image.height, image.width) == (h, w) and max(h, w) == 128
        masks = np.stack([decode_rle(c, h, w) for c in row["masks"]]) if row["masks"] else None
        boxes = np.array(row["boxes"], np.float32).reshape(-1, 4)
        if masks is not None:  # the mask's extent is the box, up to one original pixel
            np.testing.assert_allclose(masks_to_boxes(masks), boxes, atol=1 + row["scale"])
            for mask, crop, (x1, y1, x2, y2) in zip(
                masks, row["mask_crops"], row["mask_crop_boxes"], strict=True
            ):
                assert mask.sum() == mask[y1:y2, x1:x2].sum() > 0
                assert np.array_equal(decode_rle(crop, y2 - y1, x2 - x1), mask[y1:y2, x1:x2])
        crowd = torch.tensor(row["iscrowd"], dtype=torch.bool)
        flipped = boxes.copy()
        flipped[:, [0, 2]] = w - boxes[:, [2, 0]]
        for prefix, b in (("rpn_", boxes), ("rpn_flip_", flipped)):
            expected = build_rpn_targets(grid, torch.from_numpy(b), crowd, CONFIG.rpn)
            assert row[prefix + "pos"] == [expected.pos.tolist()]
            assert row[prefix + "ignore"] == [expected.ignore.tolist()]


def test_train_scales_store_targets_per_scale_and_their_cost_the_val_split_one(source, tmp_path):
    scales = (0.5, 1.0)
    train = _preprocess(source, tmp_path / "train", train_scales=scales)
    val = _preprocess(source, tmp_path / "val", train_scales=scales)
    assert train["train_scales"] == [0.5, 1.0] and val["train_scales"] == [1.0]
    table = pq.ParquetDataset(sorted((tmp_path / "train").glob("part-*.parquet"))).read()
    rows = table.to_pylist()
    assert all(len(r["rpn_pos"]) == len(r["rpn_flip_ignore"]) == 2 for r in rows)
    per_scale = [0, 0]
    for row in rows:
        for name in shards.TARGET_COLUMNS:
            for k, values in enumerate(row[name]):
                per_scale[k] += np.asarray(values).size * 4  # int32 / float32 items
    expected = [round(b / len(rows), 1) for b in per_scale]
    assert train["counts"]["target_bytes_per_image"] == expected
    assert len(val["counts"]["target_bytes_per_image"]) == 1
    # The label counts that repeat-factor sampling uses: images per non-crowd label.
    labels = [
        {lab for lab, c in zip(r["labels"], r["iscrowd"], strict=True) if not c} for r in rows
    ]
    assert train["counts"]["images_per_label"] == {
        str(label): sum(label in s for s in labels) for label in sorted(set().union(*labels))
    }


def test_same_input_gives_byte_identical_shards(train_split, source, tmp_path):
    out, _ = train_split
    _preprocess(source, tmp_path / "train")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "train").iterdir()} == first


def test_unusable_images_are_counted_skips_with_their_reason(source, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(source["images_dir"], images)
    files = sorted(images.iterdir())
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:64])  # truncated
    manifest = _preprocess({**source, "images_dir": images}, tmp_path / "train")
    skipped = manifest["counts"]["skipped"]
    assert [s["file"] for s in skipped] == [str(files[0]), str(files[1])]
    assert "not found" in skipped[0]["reason"] and "image_id=1" in skipped[0]["record"]
    assert "truncated" in skipped[1]["reason"]
    assert manifest["counts"]["images"] == source["images"] - 2
    ids = pq.read_table(tmp_path / "train" / "part-00000.parquet")["image_id"].to_pylist()
    assert ids == [3, 4, 5]  # shards hold 5 images each by id; the first lost two


def test_a_shard_whose_images_are_all_skipped_is_left_out(source, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(source["images_dir"], images)
    files = sorted(images.iterdir())  # image ids 1..n in file name order
    for file in files[5:10]:  # every image of the second shard
        file.unlink()
    manifest = _preprocess({**source, "images_dir": images}, tmp_path / "train")
    assert source["images"] > 15  # so a third shard has images
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, source["images"] - 15]
    assert [s["file"] for s in manifest["shards"]] == [f"part-0000{i}.parquet" for i in range(3)]
    assert len(manifest["counts"]["skipped"]) == 5
    ids = pq.read_table(tmp_path / "train" / "part-00001.parquet")["image_id"].to_pylist()
    assert ids == [11, 12, 13, 14, 15]


def test_a_split_without_a_readable_image_is_an_error(source, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(DataError, match="no usable images"):
        _preprocess({**source, "images_dir": images}, tmp_path / "train")
    assert not (tmp_path / "train").exists()


def test_interrupted_run_leaves_only_complete_shards(source, tmp_path, monkeypatch):
    written = []

    def write_two_then_fail(data, path):
        if len(written) == 2:
            path.with_name(path.name + ".tmp-x").write_bytes(data[:100])
            raise OSError("killed while writing")
        written.append(path.name)
        return real_write(data, path)

    real_write = shard_writer.write_shard
    monkeypatch.setattr(shard_writer, "write_shard", write_two_then_fail)
    with pytest.raises(OSError, match="killed"):
        _preprocess(source, tmp_path / "train")
    assert written == ["part-00000.parquet", "part-00001.parquet"]
    assert list(tmp_path.rglob("*")) == []  # scratch directory and its parts removed


def test_png_images_are_lossless(source, tmp_path):
    _preprocess(source, tmp_path / "train", image_format="png", rows_per_shard=64)
    row = pq.read_table(tmp_path / "train" / "part-00000.parquet").slice(0, 1).to_pylist()[0]
    image = Image.open(io.BytesIO(row["image"]))
    assert image.format == "PNG"
    original = Image.open(source["images_dir"] / row["file_name"]).convert("RGB")
    size = (image.width, image.height)
    assert np.array_equal(np.asarray(image), np.asarray(original.resize(size, Image.BILINEAR)))


def test_shards_feed_ray_data_iter_torch_batches_like_the_local_iterator(train_split):
    out, _ = train_split
    dataset = ray_dataset(out, model_config=CONFIG)
    dataset.context.execution_options.preserve_order = True
    collate = make_collate_fn(CONFIG, seed=7)
    through_ray = list(dataset.iter_torch_batches(batch_size=4, collate_fn=collate))
    crop_size = mask_crop_size(CONFIG)
    local = list(iter_batches(out, batch_size=4, model_config=CONFIG, crop_size=crop_size))
    assert len(through_ray) == len(local) == 4
    for packed, (images, targets) in zip(through_ray, local, strict=True):
        ray_images, ray_targets = unpack_batch(packed)
        assert torch.equal(ray_images, images)
        for a, b in zip(ray_targets, targets, strict=True):
            assert torch.equal(a["boxes"], b["boxes"])
            assert torch.equal(a["mask_crops"], b["mask_crops"])
            assert a["rpn_idx"].shape == (256,)


def _tiny_source(ds, as_location=str) -> dict:
    """The tiny COCO dataset's annotation file and images directory, as paths or URIs."""
    return {
        "annotation_file": as_location(ds.annotation_file),
        "images_dir": as_location(ds.images_dir),
    }


def test_images_and_shards_behind_uris_match_local_ones(tiny_coco, tmp_path, monkeypatch):
    """``local://`` goes through fsspec as object storage does, and Ray workers see it too."""
    monkeypatch.chdir(tmp_path)
    ds = tiny_coco()
    (ds.images_dir / "three.png").unlink()  # a missing image is a counted skip either way
    local_dir = tmp_path / "local" / "train"
    local = _preprocess(_tiny_source(ds), local_dir, rows_per_shard=1)
    source, uri = _tiny_source(ds, lambda p: f"local://{p}"), f"local://{tmp_path}/remote/train"
    remote = _preprocess(source, uri, rows_per_shard=1)
    [skip] = remote["counts"].pop("skipped")
    [local_skip] = local["counts"].pop("skipped")
    assert skip == {**local_skip, "file": f"{source['images_dir']}/three.png"}
    assert remote == local
    names = [shard["file"] for shard in local["shards"]]
    files = [(storage.join(local_dir, n), storage.join(uri, n)) for n in names]
    assert all(storage.read_bytes(a) == storage.read_bytes(b) for a, b in files)
    images = pq.ParquetDataset(shard_files(local_dir)[1]).read()["image"].to_pylist()
    assert sorted(row["image"] for row in ray_dataset(uri).take_all()) == sorted(images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "local", "remote"]


def test_preprocess_to_file_and_memory_uris(
    tiny_coco, tmp_path, monkeypatch, memory_dir, memory_writes
):
    monkeypatch.chdir(tmp_path)
    source = _tiny_source(tiny_coco(), lambda p: p.as_uri())
    out, in_memory = tmp_path / "shards" / "train", f"{memory_dir}/train"
    manifest = _preprocess(source, out.as_uri(), rows_per_shard=2)
    assert _preprocess(source, in_memory, rows_per_shard=2) == manifest == read_manifest(out)
    assert manifest["split"] == "train" and manifest["counts"]["images"] == 3
    parts = [("write", f"part-0000{i}.parquet") for i in range(2)]
    assert memory_writes == [*parts, ("write", shards.MANIFEST)]  # the manifest last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "shards"]  # no ./file: dir
    on_disk, from_memory = (
        list(iter_batches(split, batch_size=2, model_config=CONFIG))
        for split in (out.as_uri(), in_memory)
    )
    for (images, targets), (images_too, targets_too) in zip(on_disk, from_memory, strict=True):
        assert torch.equal(images, images_too)
        for a, b in zip(targets, targets_too, strict=True):
            assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["rpn_idx"], b["rpn_idx"])
    assert ray_dataset(out.as_uri(), model_config=CONFIG).count() == 3
