"""Storage (local paths and URIs), image decoding, the Ray runtime, the stages' output names."""
