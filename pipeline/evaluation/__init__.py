"""COCO evaluation: batch inference over the val shards with Ray Data, pycocotools scoring."""
