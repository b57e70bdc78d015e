"""Storage (local paths and URIs), image decoding, the Ray runtime, the stages' output names,
progress on the console (a bar on a terminal, plain lines otherwise)."""
