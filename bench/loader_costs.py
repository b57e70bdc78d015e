"""Two per-image costs of the shard loader, measured alone: the JPEG decode and the RPN sample.

- decode: a synthetic image of each ``--sizes`` (width x height, random ellipses on a noisy
  background) encoded as JPEG quality 95 as preprocess stores it, decoded to a channels-first
  uint8 tensor in turn by PIL (``Image.open(...).convert("RGB")``, ``np.array``, permute:
  PIL's decode and the copies behind it) and by ``torchvision.io.decode_image`` (libjpeg-turbo
  straight into the tensor);
- RPN sample: ``maskrcnn.rpn_targets.sample_rpn_targets`` drawing the 256-anchor sample from the
  stored targets of one image with 6 boxes, at each of ``--canvases``.

One torch thread. Prints JSON: mean wall and CPU ms per image (the CPU time is what other jobs
on the machine do not change).

    .venv/bin/python bench/loader_costs.py --sizes 512x384,256x192 --canvases 256,512,1024
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
from common import load_average
from PIL import Image, ImageDraw
from torchvision.io import decode_image

from maskrcnn.anchors import anchor_grid
from maskrcnn.config import AnchorConfig
from maskrcnn.rpn_targets import build_rpn_targets, sample_rpn_targets


def jpeg_bytes(width: int, height: int, rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(8, width // 2), rng.integers(8, height // 2)
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def pil_decode(data: bytes) -> torch.Tensor:
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()


def torchvision_decode(data: bytes) -> torch.Tensor:
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def decode_ms(data: bytes, repeats: int) -> dict:
    """Mean ms of each decoder, taking turns (who goes first alternates)."""
    decoders = {"pil": pil_decode, "torchvision_io": torchvision_decode}
    same = torch.equal(pil_decode(data), torchvision_decode(data))  # also the warm-up
    seconds, cpu = dict.fromkeys(decoders, 0.0), dict.fromkeys(decoders, 0.0)
    for i in range(repeats):
        for name in decoders if i % 2 else reversed(list(decoders)):
            start, cpu_start = time.perf_counter(), time.process_time()
            decoders[name](data)
            seconds[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - cpu_start
    means = {name: round(s / repeats * 1e3, 3) for name, s in seconds.items()}
    cpu_means = {f"{name}_cpu": round(s / repeats * 1e3, 3) for name, s in cpu.items()}
    return {**means, **cpu_means, "same_pixels": same}


def rpn_sample_ms(canvas: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    grid = anchor_grid(canvas, AnchorConfig())
    corner = torch.rand(6, 2, generator=g) * canvas * 0.6
    boxes = torch.cat([corner, corner + canvas * (0.05 + 0.3 * torch.rand(6, 2, generator=g))], 1)
    stored = build_rpn_targets(grid, boxes.clamp(max=canvas))
    sample_rpn_targets(stored, grid.num_anchors, generator=g)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        sample_rpn_targets(stored, grid.num_anchors, generator=g)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"wall": round(wall / repeats * 1e3, 3), "cpu": round(cpu / repeats * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512x384,256x192", help="width x height, comma list")
    parser.add_argument("--canvases", default="256,512,1024")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    load_at_start = load_average()
    decode = {}
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        decode[size] = decode_ms(jpeg_bytes(width, height, rng), args.repeats)
    canvases = [int(c) for c in args.canvases.split(",")]
    result = {
        "torch_threads": 1,
        "repeats": args.repeats,
        "decode_ms": decode,
        "rpn_sample_ms": {str(c): rpn_sample_ms(c, args.repeats) for c in canvases},
        "load_average": {"start": load_at_start, "end": load_average()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
