"""Reading a COCO-format instances dataset: what every later stage sees of the source data.

``read_coco`` parses the annotation file with pycocotools semantics and checks every record:
file-level problems (a missing, empty or malformed file, duplicate image ids, no usable image)
are a ``DataError`` that names the file, the record and the reason; a bad record (an unsafe
file name, or one that leads out of the images directory through a symbolic link; an annotation
on an unknown image or category, geometry outside the image) becomes a counted ``Skip`` with
its reason. Image files are opened later, by ``load_image``, which
raises ``DataError`` for a missing, unreadable or wrongly sized file so that the caller
(preprocess) can count it as a skip. docs/data.md lists every case and why it is an error or
a skip.

The annotation file and the images directory are local paths or URIs (``s3://``, ``gs://``,
``file://``, any fsspec protocol: ``pipeline.io.storage``). An image on object storage is read
with one request and no separate existence check: a missing one fails that read, which is
the same counted skip as a missing local file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from pipeline.coco.masks import decode_segmentation, rasterize_polygons, resize_mask
from pipeline.coco.validate import Box, Rejected, Segmentation, check_annotation, crowd_flag
from pipeline.io import storage
from pipeline.io.images import ImageReadError, read_rgb, resized_size


class DataError(ValueError):
    """Bad input data: ``file``, ``record`` (which entry) and ``reason`` (what is wrong)."""

    def __init__(self, file: str | Path, record: str, reason: str):
        self.file, self.record, self.reason = str(file), record, reason
        super().__init__(f"{self.file}: {record}: {reason}")

    def __reduce__(self):  # keep the three fields when pickled across Ray workers
        return (type(self), (self.file, self.record, self.reason))


@dataclass(frozen=True)
class Instance:
    """One annotation: its box is (x1, y1, x2, y2) in original pixels, clipped to the image."""

    category_id: int
    label: int  # contiguous 1..K, in order of category id
    iscrowd: bool
    bbox: Box
    segmentation: Segmentation  # polygons (clipped to the image) or an RLE dict
    ann_id: int


@dataclass(frozen=True)
class ImageRecord:
    """One usable image and its instances, in annotation-file order."""

    image_id: int
    file_name: str
    images_dir: Path | str  # a local directory, or a URI (see ``storage.locate``)
    height: int
    width: int
    instances: tuple[Instance, ...]

    @property
    def path(self) -> Path | str:
        """The image file: a Path under a local images_dir, else its URI."""
        if isinstance(self.images_dir, Path):
            return self.images_dir / self.file_name
        return storage.join(self.images_dir, self.file_name)


@dataclass(frozen=True)
class Skip:
    """A record left out, and why: e.g. record ``annotation id=12 (image_id=7)``."""

    file: str
    record: str
    reason: str


@dataclass
class CocoIndex:
    """The checked content of one annotation file."""

    annotation_file: Path | str  # a Path when local, else a URI (``storage.locate``)
    images_dir: Path | str
    sha256: str  # of the annotation file's bytes
    categories: list[dict[str, Any]]  # [{"id", "name", "label"}], sorted by id
    records: list[ImageRecord]  # sorted by image id
    skipped: list[Skip] = field(default_factory=list)


def read_coco(annotation_file: storage.Location, images_dir: storage.Location) -> CocoIndex:
    """Parse and check a COCO instances file whose file names are relative to images_dir.

    Both may be local paths or URIs; image files are not opened here (see ``load_image``).
    """
    path, images_dir = storage.locate(annotation_file), storage.locate(images_dir)
    if isinstance(images_dir, str):
        storage.filesystem(images_dir)  # an unknown protocol is an error now, not a skip per image
    raw = _read_bytes(path)
    data = _parse_json(path, raw)
    categories = _categories(path, data)
    label_of = {c["id"]: c["label"] for c in categories}
    images, refused, skipped = _images(path, data, images_dir)

    instances: dict[int, list[Instance]] = {image_id: [] for image_id in images}
    dropped_with_image: Counter[int] = Counter()
    seen_ids: set[int] = set()
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(path, "annotations", "'annotations' is not a list")
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            skipped.append(Skip(str(path), f"annotations[{index}]", "not a JSON object"))
            continue
        image_id, ann_id = ann.get("image_id"), ann.get("id")
        record = f"annotation id={ann_id} (image_id={image_id})"
        if _hashable(image_id) and image_id in refused:
            dropped_with_image[image_id] += 1
            continue
        try:
            if not _is_int(ann_id):
                raise Rejected(f"annotation id is not an integer: {ann_id!r}")
            if ann_id in seen_ids:
                raise Rejected("duplicate annotation id (the first one is kept)")
            seen_ids.add(ann_id)
            if not _hashable(image_id) or image_id not in images:
                raise Rejected(f"unknown image id {image_id!r}")
            category_id = ann.get("category_id")
            if not _hashable(category_id) or category_id not in label_of:
                raise Rejected(f"category id {category_id!r} is not in categories")
            image = images[image_id]
            box, segmentation = check_annotation(ann, image["height"], image["width"])
            iscrowd = crowd_flag(ann.get("iscrowd", 0))
        except Rejected as rejected:
            skipped.append(Skip(str(path), record, rejected.reason))
            continue
        instances[image_id].append(
            Instance(
                category_id=category_id,
                label=label_of[category_id],
                iscrowd=iscrowd,
                bbox=box,
                segmentation=segmentation,
                ann_id=ann_id,
            )
        )

    for image_id, reason in refused.items():
        dropped = dropped_with_image[image_id]
        suffix = f" ({dropped} annotations dropped with it)" if dropped else ""
        skipped.append(Skip(str(path), f"image_id={image_id}", reason + suffix))
    records = [
        ImageRecord(
            image_id=image_id,
            file_name=image["file_name"],
            images_dir=images_dir,
            height=image["height"],
            width=image["width"],
            instances=tuple(instances[image_id]),
        )
        for image_id, image in sorted(images.items())
    ]
    if not records:
        reasons = "; ".join(sorted({s.reason for s in skipped if s.record.startswith("image")}))
        raise DataError(path, "images", f"no usable images ({reasons or 'none listed'})")
    return CocoIndex(
        annotation_file=path,
        images_dir=images_dir,
        sha256=hashlib.sha256(raw).hexdigest(),
        categories=categories,
        records=records,
        skipped=skipped,
    )


def load_image(record: ImageRecord) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of a record's image; DataError if missing, unreadable or resized."""
    where = f"image_id={record.image_id}"
    try:
        pixels = read_image(record.images_dir, record.file_name)
    except ImageReadError as error:
        raise DataError(record.path, where, str(error)) from None
    height, width = pixels.shape[:2]
    if (height, width) != (record.height, record.width):
        raise DataError(
            record.path,
            where,
            f"image is {height}x{width} (after EXIF orientation) but the annotation file says "
            f"{record.height}x{record.width}",
        )
    return pixels


def read_image(images_dir: storage.Location, file_name: str) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of ``file_name`` under ``images_dir`` (a local path or a URI);
    ImageReadError when the file is missing or unreadable.

    A local file is opened directly; from other storage the bytes are read in one request.
    """
    images_dir = storage.locate(images_dir)
    if isinstance(images_dir, Path):
        return read_rgb(images_dir / file_name)
    try:
        data = storage.read_under(images_dir, file_name)
    except FileNotFoundError:
        raise ImageReadError("image file not found") from None
    except OSError as error:
        raise ImageReadError(f"cannot read the image file: {error}") from None
    return read_rgb(data)


def instance_masks(record: ImageRecord, *, scale: float) -> np.ndarray:
    """[N, h', w'] uint8 masks of a record's instances at the resized size (see resized_size).

    Polygons are scaled and rasterised directly at the resized size (exact); RLE masks are
    decoded at the original size and resized (bilinear, threshold 0.5).
    """
    height, width = resized_size(record.height, record.width, scale)
    masks = np.zeros((len(record.instances), height, width), np.uint8)
    sx, sy = width / record.width, height / record.height
    for i, instance in enumerate(record.instances):
        if isinstance(instance.segmentation, dict):
            full = decode_segmentation(instance.segmentation, record.height, record.width)
            masks[i] = resize_mask(full, height, width)
        else:
            masks[i] = rasterize_polygons(instance.segmentation, height, width, sx=sx, sy=sy)
    return masks


def instance_boxes(record: ImageRecord, *, scale: float) -> np.ndarray:
    """float32 [N, 4] boxes (x1, y1, x2, y2) at the resized size, scaled as instance_masks."""
    height, width = resized_size(record.height, record.width, scale)
    factors = np.array([width / record.width, height / record.height] * 2, np.float64)
    boxes = np.array([i.bbox for i in record.instances], np.float64).reshape(-1, 4)
    return (boxes * factors).astype(np.float32)


def _read_bytes(path: Path | str) -> bytes:
    try:
        raw = path.read_bytes() if isinstance(path, Path) else storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError(path, "file", "annotation file not found") from None
    except OSError as error:
        raise DataError(path, "file", f"cannot read the annotation file: {error}") from None
    if not raw.strip():
        raise DataError(path, "file", "the annotation file is empty")
    return raw


def _parse_json(path: Path | str, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise DataError(path, where, f"malformed JSON: {error.msg}") from None
    except UnicodeDecodeError as error:
        reason = "the annotation file is not UTF-8 (save it as UTF-8)"
        raise DataError(path, f"byte {error.start}", reason) from None
    if not isinstance(data, dict):
        raise DataError(path, "top level", "expected a JSON object with images and categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(path, key, f"'{key}' is missing or not a list")
    return data


def _categories(path: Path | str, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Categories sorted by id, with contiguous labels 1..K."""
    by_id: dict[int, str] = {}
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict):
            raise DataError(path, f"categories[{index}]", "a category must be a JSON object")
        if not _is_int(category.get("id")):
            reason = f"a category needs an integer 'id', got {category.get('id')!r}"
            raise DataError(path, f"categories[{index}]", reason)
        if category["id"] in by_id:
            listed = sum(
                isinstance(c, dict) and c.get("id") == category["id"] for c in data["categories"]
            )
            reason = f"duplicate category id (listed {listed} times)"
            raise DataError(path, f"category id={category['id']}", reason)
        by_id[category["id"]] = str(category.get("name", category["id"]))
    if not by_id:
        raise DataError(path, "categories", "the list is empty: at least one category is needed")
    return [
        {"id": cid, "name": by_id[cid], "label": label}
        for label, cid in enumerate(sorted(by_id), start=1)
    ]


def _images(
    path: Path | str, data: dict[str, Any], images_dir: Path | str
) -> tuple[dict[int, dict[str, Any]], dict[Any, str], list[Skip]]:
    """Usable image entries by id, refused image ids with their reason, and other skips."""
    entries = data["images"]
    counts = Counter(e.get("id") for e in entries if isinstance(e, dict) and _is_int(e.get("id")))
    duplicates = sorted(image_id for image_id, n in counts.items() if n > 1)
    if duplicates:
        raise DataError(
            path,
            f"image_id={duplicates[0]}",
            f"duplicate image id, listed {counts[duplicates[0]]} times ({len(duplicates)} ids "
            "repeated): annotations cannot be assigned to one image unambiguously",
        )
    images: dict[int, dict[str, Any]] = {}
    refused: dict[Any, str] = {}
    skipped: list[Skip] = []
    links = _LinkCheck(images_dir) if isinstance(images_dir, Path) else None
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            skipped.append(Skip(str(path), f"images[{index}]", "image entry without integer id"))
            continue
        reason = _image_problem(entry)
        if reason is None and links is not None:
            reason = links.problem(entry["file_name"])
        if reason:
            refused[entry["id"]] = reason
        else:
            images[entry["id"]] = entry
    return images, refused, skipped


def _image_problem(entry: dict[str, Any]) -> str | None:
    """Why an image entry is refused, or None."""
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        return "no file_name"
    windows = PureWindowsPath(file_name)  # splits on both / and \
    if windows.anchor or file_name.startswith("/") or ".." in windows.parts:
        return f"file_name {file_name!r} escapes the images directory (absolute or '..')"
    for key in ("height", "width"):
        if not _is_int(entry.get(key)) or entry[key] <= 0:
            return f"{key} is not a positive integer: {entry.get(key)!r}"
    return None


class _LinkCheck:
    """Refuses a file name whose real path (symbolic links followed) lies outside the images
    directory, as a '..' part is refused. One ``lstat`` per image, one ``realpath`` per folder."""

    def __init__(self, images_dir: Path):
        self.images_dir = str(images_dir)
        self.root = os.path.realpath(images_dir)  # the directory itself may be a link
        self.folders: dict[str, tuple[str, bool]] = {}  # folder -> (real path, inside root)

    def problem(self, file_name: str) -> str | None:
        folder, name = os.path.split(file_name)
        if folder not in self.folders:
            real_folder = os.path.realpath(os.path.join(self.images_dir, folder))
            self.folders[folder] = (real_folder, self._inside(real_folder))
        real_folder, inside = self.folders[folder]
        real = os.path.join(real_folder, name)
        if inside and os.path.islink(real):
            real = os.path.realpath(real)
            inside = self._inside(real)
        if inside:
            return None
        return (
            f"file_name {file_name!r} leads through a symbolic link to {real}, outside the "
            "images directory"
        )

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hashable(value: Any) -> bool:
    return isinstance(value, (int, str, float, type(None))) and not isinstance(value, bool)
