"""evaluate() on a two-node Ray cluster whose actors cannot see the driver's model file.

The documented RayJob runs the driver on a head node without workers' resources, so every
inference actor runs on another node, which does not see the driver's local artifacts
directory. Here the head has no CPUs (the actors and read tasks all go to the second node) and
the model file is deleted once the driver has opened it: only the driver's open descriptor,
``/dev/fd/N``, still reaches it, as the driver's local disk would on a real cluster. The actors
must get the model from the object store, not from a path.
"""

from __future__ import annotations

import json
import os

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from maskrcnn.checkpoints import save_model
from maskrcnn.config import ModelConfig
from maskrcnn.model import MaskRCNN
from pipeline.evaluation.evaluate import evaluate
from pipeline.shards.preprocess import preprocess_split

pytestmark = pytest.mark.cluster
OBJECT_STORE_BYTES = 100 * 1024**2


def tiny_config() -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "num_classes": 6,
            "backbone": "resnet18",
            "canvas": 64,
            "fpn_channels": 16,
            "roi": {"representation_size": 32, "mask_layers": [16], "score_thresh": 0.0},
            "rpn": {"pre_nms_top_n_test": 50, "post_nms_top_n_test": 20},
        }
    )


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (the driver's node) and a worker node with two."""
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES},
    )
    nodes.add_node(num_cpus=2, object_store_memory=OBJECT_STORE_BYTES)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def test_actors_on_another_node_get_the_model_from_the_object_store(
    cluster, shapes_dataset, tmp_path
):
    root, summary = shapes_dataset
    split = summary["val"]
    annotation_file, images_dir = root / split["annotation_file"], root / split["images_dir"]
    preprocess_split(
        annotation_file=annotation_file,
        images_dir=images_dir,
        out_dir=tmp_path / "shards" / "val",
        model_config=tiny_config(),
        progress=False,
    )
    torch.manual_seed(0)
    model_file = tmp_path / "artifacts" / "model.pt"
    save_model(MaskRCNN(tiny_config()), model_file)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2

    with model_file.open("rb") as handle:
        model_file.unlink()  # the artifacts directory's file is gone for every other process
        metrics = evaluate(
            model_path=f"/dev/fd/{handle.fileno()}",
            shards_dir=tmp_path / "shards" / "val",
            annotation_file=annotation_file,
            images_dir=images_dir,
            out_dir=tmp_path / "eval",
            num_overlays=0,
            concurrency=1,
            ray_address=cluster.address,
        )
    assert metrics["num_images"] == 4
    assert metrics["num_detections"] > 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    assert not os.path.exists(model_file)
