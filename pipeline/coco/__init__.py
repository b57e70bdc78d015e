"""COCO-format input: reading and validating annotation files, masks, the synthetic dataset."""
