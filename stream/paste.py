"""Paste-back (SPEC §5.5): the engine's face back into the portrait, on the host or on the engine's device, as the
full-size image or straight into the streamed frame.

`result = mask·warp(face, M_c2o) + (1 − mask)·portrait`, with the official feathered mask template warped once per
portrait. Everything per frame is restricted to the box where that mask is non-zero, so the cost scales with the
face, not with the portrait. A paste is built once per portrait and `Target`, then called per frame with the face as
the engine returns it, (S,S,3) uint8 (S = 512 from the real generator, 256 in the tiny config):

    pastes = Pastes()                         # one per session (stream/pipeline.py Animator)
    image = pastes(source, face)              # the full-size RGB image: a host array, or a tensor on the face's device
    frame = pastes(source, face, stream_max)  # the yuv420p av.VideoFrame to send, its longer side <= stream_max

| face on        | full-size image (recorded, shown) | streamed frame (sent)                                   |
|----------------|-----------------------------------|---------------------------------------------------------|
| host (ndarray) | `PasteBack` (cv2)                 | `StreamPaste`: PasteBack into the portrait at the       |
|                |                                   | streamed size; per frame only the face's box is         |
|                |                                   | converted, no full-size image is made                   |
| torch device   | `TorchPasteBack` (grid_sample)    | `TorchStreamPaste`: TorchPasteBack, then resize and     |
|                |                                   | colour on the device; only the planes reach the host    |

Colour conversion is stream/encode.py's. Face pixel u_S maps to the 512-crop pixel k·(u_S + ½) − ½ with k = 512/S,
i.e. pixel centres stay aligned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import av
# The streamed targets import the codec stack (stream/encode.py: av, aiortc) where they are built and called: the
# full-size ones need none of it, so the GPU check's paste step runs on a machine without av or aiortc.

DSIZE = 512
Face = np.ndarray | torch.Tensor  # (S,S,3) uint8, as the engine returns it


def mask_template(dsize: int = DSIZE) -> np.ndarray:
    """Official mask_template.png reproduced numerically: 255 inside [16, dsize−16]², a 16 px linear fall-off
    with rounded corners outside it (`clip(round(255 − 16·d), 0, 255)`, d = distance of the pixel centre)."""
    i = np.arange(dsize, dtype=np.float64)
    d1 = np.maximum(np.maximum(16.0 - i, i - (dsize - 16.0)), 0.0)
    d = np.hypot(d1[:, None], d1[None, :])
    return np.clip(np.round(255.0 - 16.0 * d), 0, 255).astype(np.uint8)


def _resize_map(kx: float, ky: float) -> np.ndarray:
    """3×3 map of a resize by (kx, ky) in pixel coordinates, pixel-centre aligned (as cv2.resize maps pixels)."""
    return np.array([[kx, 0, (kx - 1) / 2], [0, ky, (ky - 1) / 2], [0, 0, 1]])


def _as3x3(m: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(m, np.float64)[:2], [0, 0, 1]])


def _face_region(shape: tuple[int, ...], m_c2o: np.ndarray) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The mask template warped by `m_c2o` into an image of `shape`, cut to the box where it is non-zero:
    ((x0, y0, x1, y1), (y1−y0)×(x1−x0) float32 in [0, 1]). The corners are even, so that every 2×2 chroma block of
    a streamed frame lies wholly inside the box or wholly outside it; outside the mask the blend keeps the portrait."""
    h, w = shape[:2]
    mask = cv2.warpAffine(mask_template(), _as3x3(m_c2o)[:2], (w, h), flags=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("The face crop lies outside the source image.")
    x0, y0 = int(xs.min()) & ~1, int(ys.min()) & ~1
    x1, y1 = min(w, (int(xs.max()) + 2) & ~1), min(h, (int(ys.max()) + 2) & ~1)
    return (x0, y0, x1, y1), (mask[y0:y1, x0:x1] / 255.0).astype(np.float32)


class Paste(Protocol):
    """One portrait and one target: build once, call per frame with the engine's face."""

    def __call__(self, face: Any) -> Face | av.VideoFrame: ...


class PasteBack:
    """The full-size image on the host (cv2), for faces of size `size`. The blend is cv2.blendLinear, which rounds
    where the official float blend truncates (at most 1 grey level apart)."""

    def __init__(self, image: np.ndarray, m_c2o: np.ndarray, size: int = DSIZE):
        self.image = image
        self.box, self.mask = _face_region(image.shape, m_c2o)
        x0, y0, x1, y1 = self.box
        self.inv_mask = np.ascontiguousarray(1.0 - self.mask)
        self.orig = np.ascontiguousarray(image[y0:y1, x0:x1])
        to_box = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64)
        self.m_face2box = (to_box @ _as3x3(m_c2o) @ _resize_map(DSIZE / size, DSIZE / size))[:2]

    def blend(self, face: np.ndarray) -> np.ndarray:
        """The box's pixels with `face` (S×S×3 uint8) pasted in."""
        x0, y0, x1, y1 = self.box
        warped = cv2.warpAffine(face, self.m_face2box, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)
        return cv2.blendLinear(warped, self.orig, self.mask, self.inv_mask)

    def __call__(self, face: np.ndarray) -> np.ndarray:
        """A new full-size uint8 RGB image with `face` pasted in."""
        x0, y0, x1, y1 = self.box
        out = self.image.copy()
        out[y0:y1, x0:x1] = self.blend(face)
        return out


class StreamPaste:
    """The streamed yuv420p frame on the host: a PasteBack into the portrait resized to the streamed size, so the
    face is resampled once (straight to that size), not pasted at full size and resized after. The portrait's planes
    are converted once; per frame only the face's box is blended and converted."""

    def __init__(self, image: np.ndarray, m_c2o: np.ndarray, size: int, stream_max: int):
        from stream.encode import chroma_planes, stream_size, yuv420_host
        h, w = image.shape[:2]
        self.size = w2, h2 = stream_size(w, h, stream_max)
        small = image if (w2, h2) == (w, h) else cv2.resize(image, (w2, h2), interpolation=cv2.INTER_LINEAR)
        self.paste = PasteBack(small, _resize_map(w2 / w, h2 / h) @ _as3x3(m_c2o), size)
        planes = yuv420_host(np.ascontiguousarray(small), (w2, h2))
        self.planes = (planes[:h2], *chroma_planes(planes, w2, h2))  # Y, U, V

    def __call__(self, face: np.ndarray) -> av.VideoFrame:
        """`face` (S×S×3 uint8) pasted in -> the yuv420p frame to send."""
        import av
        from stream.encode import chroma_planes, yuv420_host
        (x0, y0, x1, y1), (w, h) = self.paste.box, self.size
        box = yuv420_host(self.paste.blend(face), (x1 - x0, y1 - y0))
        frame = av.VideoFrame(w, h, "yuv420p")  # written in place: one copy of the portrait's planes
        parts = (box[:y1 - y0], *chroma_planes(box, x1 - x0, y1 - y0))
        for plane, base, part, k in zip(frame.planes, self.planes, parts, (1, 2, 2)):
            view = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]
            view[:] = base
            view[y0 // k:y1 // k, x0 // k:x1 // k] = part
        return frame


class TorchPasteBack:
    """The full-size image on a torch device (any face size): the sampling grid is built once, each frame is one
    grid_sample and a blend, and the image stays on the device."""

    def __init__(self, image: np.ndarray, m_c2o: np.ndarray, device: str | torch.device = "cpu"):
        self.box, mask = _face_region(image.shape, m_c2o)
        x0, y0, x1, y1 = self.box
        m_o2c = np.linalg.inv(_as3x3(m_c2o))
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        u = m_o2c[0, 0] * xs + m_o2c[0, 1] * ys + m_o2c[0, 2]  # 512-crop pixel coords of each box pixel
        v = m_o2c[1, 0] * xs + m_o2c[1, 1] * ys + m_o2c[1, 2]
        grid = np.stack([(u + 0.5) * 2 / DSIZE - 1, (v + 0.5) * 2 / DSIZE - 1], -1)  # independent of S
        self.grid = torch.from_numpy(grid[None].astype(np.float32)).to(device)
        self.mask = torch.from_numpy(mask)[None, None].to(device)
        self.image = torch.from_numpy(np.ascontiguousarray(image)).to(device)
        self.orig = self.image[y0:y1, x0:x1].permute(2, 0, 1)[None].float()

    @torch.no_grad()
    def __call__(self, face: torch.Tensor) -> torch.Tensor:
        """`face` (S,S,3) uint8 on the device -> the full image, H×W×3 uint8 on the device."""
        x0, y0, x1, y1 = self.box
        warped = F.grid_sample(face.permute(2, 0, 1)[None].float(), self.grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        blend = self.mask * warped + (1.0 - self.mask) * self.orig
        out = self.image.clone()
        out[y0:y1, x0:x1] = blend[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8)
        return out


class TorchStreamPaste:
    """The streamed yuv420p frame from a torch device: TorchPasteBack, then resize and colour conversion there
    (stream/encode.py), so only the streamed planes cross to the host."""

    def __init__(self, image: np.ndarray, m_c2o: np.ndarray, device: str | torch.device, stream_max: int):
        from stream.encode import StreamFrames
        self.paste, self.frames = TorchPasteBack(image, m_c2o, device), StreamFrames(stream_max)

    def __call__(self, face: torch.Tensor) -> av.VideoFrame:
        return self.frames(self.paste(face))


@dataclass(frozen=True)
class Target:
    """What a paste makes: for faces of size `face` on `device` (None: host arrays), the full-size image, or with
    `stream_max` the streamed frame. The key a session's pastes are kept under."""
    face: int
    device: torch.device | None = None
    stream_max: int | None = None

    @classmethod
    def of(cls, face: Face, stream_max: int | None = None) -> Target:
        return cls(len(face), face.device if isinstance(face, torch.Tensor) else None, stream_max)

    def build(self, image: np.ndarray, m_c2o: np.ndarray) -> Paste:
        """The paste of this target into `image` (the table in the module docstring)."""
        if self.device is None:
            return PasteBack(image, m_c2o, self.face) if self.stream_max is None else \
                StreamPaste(image, m_c2o, self.face, self.stream_max)
        return TorchPasteBack(image, m_c2o, self.device) if self.stream_max is None else \
            TorchStreamPaste(image, m_c2o, self.device, self.stream_max)


class Pastes:
    """A session's pastes: one per Target, built on first use for the portrait of the last call; a new portrait
    (another `source` object) drops them. Calls come one at a time (a session's frames finish in order)."""

    def __init__(self) -> None:
        self.source: Any = None
        self._built: dict[Target, Paste] = {}

    def __call__(self, source: Any, face: Face, stream_max: int | None = None) -> Face | av.VideoFrame:
        """`face` pasted into `source.image` (a SourceFace: stream/face.py) by its crop's M_c2o: the full-size image,
        or with `stream_max` the streamed frame."""
        if source is not self.source:
            self.source, self._built = source, {}
        target = Target.of(face, stream_max)
        if target not in self._built:
            self._built[target] = target.build(source.image, source.crop.m_c2o)
        return self._built[target](face)
