"""Device and DDP settings for a training worker (they matter on GPUs; on CPU they are no-ops
or defaults)."""

from __future__ import annotations

from typing import Any

import torch

from maskrcnn.config import ModelConfig


def configure_device(device: torch.device, *, amp: str) -> None:
    """GPU settings that pay on the fixed canvas: cuDNN times the convolution algorithms once
    per input shape and keeps the fastest (the backbone's shapes never change; the mask head's
    vary with the positives, up to ``batch * roi.positive_fraction * batch_size_per_image``
    shapes), and fp32 runs use TF32 for matmuls and convolutions (float32 range, 10-bit
    mantissa; PyTorch's default keeps matmuls in full fp32)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if amp == "none":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


def ddp_kwargs(model_config: ModelConfig) -> dict[str, Any]:
    """DistributedDataParallel options: gradients live in DDP's buckets (no copy per step), and
    buffers are not re-broadcast on every forward when they cannot change (frozen BatchNorm's
    are constants, synchronised BatchNorm's are the same on every rank by construction; plain
    trainable BatchNorm's running statistics still need rank 0's copy)."""
    return {"broadcast_buffers": model_config.norm == "bn", "gradient_as_bucket_view": True}
