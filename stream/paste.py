"""Paste the generated face back into the full-resolution portrait (SPEC §5.5).

`result = mask·warp(face, M_c2o) + (1 − mask)·source`, with the official feathered mask template warped once per
source. Everything per frame is restricted to the bounding box of the non-zero mask, so the cost scales with the
face, not with the portrait. Two implementations of the same math:

- `PasteBack` (numpy + cv2, CPU): takes the uint8 face the official code would produce.
- `TorchPasteBack` (any torch device): keeps the generator output on the device; the sampling grid is built once
  and each frame is one `grid_sample` plus a blend. It skips the official uint8 rounding of the face before
  warping (differences stay below ~1 grey level).

The face may be any size S (512 from the real generator, 256 in tiny test configs): crop pixel u_S maps to the
512-crop pixel k·(u_S + ½) − ½ with k = 512/S, i.e. pixel centres stay aligned.
"""
import cv2
import numpy as np
import torch
import torch.nn.functional as F

DSIZE = 512


def mask_template(dsize: int = DSIZE) -> np.ndarray:
    """Official mask_template.png reproduced numerically: 255 inside [16, dsize−16]², a 16 px linear fall-off
    with rounded corners outside it (`clip(round(255 − 16·d), 0, 255)`, d = distance of the pixel centre)."""
    i = np.arange(dsize, dtype=np.float64)
    d1 = np.maximum(np.maximum(16.0 - i, i - (dsize - 16.0)), 0.0)
    d = np.hypot(d1[:, None], d1[None, :])
    return np.clip(np.round(255.0 - 16.0 * d), 0, 255).astype(np.uint8)


def _face_to_crop(size: int, dsize: int = DSIZE) -> np.ndarray:
    """3×3 map from face pixels (S×S) to dsize-crop pixels, pixel-centre aligned."""
    k = dsize / size
    return np.array([[k, 0, (k - 1) / 2], [0, k, (k - 1) / 2], [0, 0, 1]])


def _as3x3(m: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(m, np.float64)[:2], [0, 0, 1]])


def _warped_mask(image: np.ndarray, m_c2o: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Mask warped into the source once, cut to the box where it is non-zero: ((x0, y0, x1, y1), h×w×1 in [0,1])."""
    h, w = image.shape[:2]
    mask = cv2.warpAffine(mask_template(), _as3x3(m_c2o)[:2], (w, h), flags=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("The face crop lies outside the source image.")
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return (x0, y0, x1, y1), (mask[y0:y1, x0:x1, None] / 255.0).astype(np.float32)


class PasteBack:
    """CPU paste-back for one source image and face size S; build once, call per frame. The blend is
    cv2.blendLinear, which rounds where the official float blend truncates (at most 1 grey level apart)."""

    def __init__(self, image: np.ndarray, m_c2o: np.ndarray, size: int = DSIZE):
        (x0, y0, x1, y1), mask = _warped_mask(image, m_c2o)
        self.image, self.box = image, (x0, y0, x1, y1)
        self.mask, self.inv_mask = np.ascontiguousarray(mask[..., 0]), np.ascontiguousarray(1.0 - mask[..., 0])
        self.orig = np.ascontiguousarray(image[y0:y1, x0:x1])
        shift = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)
        self.m_face2roi = (shift @ _as3x3(m_c2o) @ _face_to_crop(size))[:2]

    def __call__(self, face: np.ndarray) -> np.ndarray:
        """Return a new full-resolution uint8 RGB image with `face` (S×S×3 uint8) pasted in."""
        x0, y0, x1, y1 = self.box
        warped = cv2.warpAffine(face, self.m_face2roi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)
        out = self.image.copy()
        out[y0:y1, x0:x1] = cv2.blendLinear(warped, self.orig, self.mask, self.inv_mask)
        return out


class TorchPasteBack:
    """Paste-back on a torch device for one source image (any face size): build once, call per frame."""

    def __init__(self, image: np.ndarray, m_c2o: np.ndarray, device: str | torch.device = "cpu"):
        (x0, y0, x1, y1), mask = _warped_mask(image, m_c2o)
        self.box = (x0, y0, x1, y1)
        m_o2c = np.linalg.inv(_as3x3(m_c2o))
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        u = m_o2c[0, 0] * xs + m_o2c[0, 1] * ys + m_o2c[0, 2]  # 512-crop pixel coords of each box pixel
        v = m_o2c[1, 0] * xs + m_o2c[1, 1] * ys + m_o2c[1, 2]
        grid = np.stack([(u + 0.5) * 2 / DSIZE - 1, (v + 0.5) * 2 / DSIZE - 1], -1)  # independent of S
        self.grid = torch.from_numpy(grid[None].astype(np.float32)).to(device)
        self.mask = torch.from_numpy(mask).permute(2, 0, 1)[None].to(device)
        self.image = torch.from_numpy(np.ascontiguousarray(image)).to(device)
        self.orig = self.image[y0:y1, x0:x1].permute(2, 0, 1)[None].float()

    @torch.no_grad()
    def __call__(self, face: torch.Tensor) -> torch.Tensor:
        """Return the full image as an H×W×3 uint8 tensor on the device; `face` is (1,)3×S×S float in [0, 1]."""
        x0, y0, x1, y1 = self.box
        face = face.reshape(1, 3, *face.shape[-2:]).float().clamp(0, 1) * 255.0
        warped = F.grid_sample(face, self.grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        blend = self.mask * warped + (1.0 - self.mask) * self.orig
        out = self.image.clone()
        out[y0:y1, x0:x1] = blend[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8)
        return out
