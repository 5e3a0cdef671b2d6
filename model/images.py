"""Image <-> tensor conventions of the official wrapper (prepare_source / parse_output)."""
import cv2
import numpy as np
import torch


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB (or a batch NxHxWx3) -> float32 NCHW in [0,1]; resized to 256 (bilinear) if needed.
    No mean/std normalisation: F and M were trained on plain [0,1] pixels."""
    batch = rgb if rgb.ndim == 4 else rgb[None]
    if batch.shape[1:3] != (256, 256):
        batch = np.stack([cv2.resize(im, (256, 256)) for im in batch])
    x = np.clip(batch.astype(np.float32) / 255.0, 0, 1)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def to_image(x: torch.Tensor) -> np.ndarray:
    """NCHW in [0,1] -> NxHxWx3 uint8. Truncates (official astype(uint8)), does not round."""
    out = np.transpose(x.detach().float().cpu().numpy(), (0, 2, 3, 1))
    return np.clip(np.clip(out, 0, 1) * 255, 0, 255).astype(np.uint8)
