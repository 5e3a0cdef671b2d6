"""Paste-back (stream/paste.py): every target makes the same picture, a session keeps one paste per named target,
and the frame's modules use each other only through public names."""
import ast
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from conftest import ROOT
from stream.encode import StreamFrames, stream_size
from stream.paste import PasteBack, Pastes, StreamPaste, Target, TorchPasteBack, TorchStreamPaste


class Portrait:
    """A portrait with its face crop's M_c2o: the crop (512 px) rotated, scaled and moved into the image, as a
    tracked face would be (no face tracker needed)."""

    def __init__(self, size: int):
        self.image = cv2.resize(skimage.data.astronaut(), (size, size * 3 // 4), interpolation=cv2.INTER_CUBIC)
        a, s = np.deg2rad(12.0), 0.45 * size / 512
        m = np.array([[s * np.cos(a), -s * np.sin(a), 0.3 * size], [s * np.sin(a), s * np.cos(a), 0.05 * size]])
        self.crop = type("Crop", (), {"m_c2o": m})()


def face(size: int) -> np.ndarray:
    """A photo-like face the portrait does not already hold (cv2's and torch's sampling agree within a few levels
    on it; on noise they do not)."""
    return np.ascontiguousarray(cv2.resize(skimage.data.chelsea(), (size, size), interpolation=cv2.INTER_AREA))


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64))


@pytest.mark.parametrize("size, face_size", [(640, 256), (1280, 512)])
def test_every_target_makes_the_same_picture(size, face_size):
    """Host and device, full size and streamed: one picture, up to cv2's and torch's sampling (and, when the
    stream is smaller, the resize filter)."""
    p, f = Portrait(size), face(face_size)
    full = PasteBack(p.image, p.crop.m_c2o, face_size)(f)
    assert diff(full, p.image).max() > 50  # the face really is pasted in
    on_device = TorchPasteBack(p.image, p.crop.m_c2o)(torch.from_numpy(f)).numpy()
    d = diff(on_device, full)
    assert d.max() <= 3 and d.mean() < 0.3  # blendLinear rounds where torch truncates
    w, h = stream_size(size, size * 3 // 4, 720)
    streamed = StreamPaste(p.image, p.crop.m_c2o, face_size, 720)(f)
    from_device = TorchStreamPaste(p.image, p.crop.m_c2o, "cpu", 720)(torch.from_numpy(f))
    two_steps = StreamFrames(720)(full)
    resized = w != size
    for frame, mean in ((streamed, 0.3), (from_device, 1.0 if resized else 0.3)):  # the device resize antialiases
        assert (frame.width, frame.height, frame.format.name) == (w, h, "yuv420p")
        d = diff(frame.to_ndarray(), two_steps.to_ndarray())
        assert d.mean() < mean and np.percentile(d, 99) <= 8


def test_the_box_has_even_corners_and_the_portrait_outside_it_is_untouched():
    """Every 2x2 chroma block of the streamed frame is wholly inside the box or outside it; outside the mask the
    full-size image is the portrait's own pixels."""
    p = Portrait(641)
    paste = PasteBack(p.image, p.crop.m_c2o, 256)
    x0, y0, x1, y1 = paste.box
    assert x0 % 2 == y0 % 2 == 0 and (x1 % 2 == 0 or x1 == p.image.shape[1]) and y1 % 2 == 0
    out = paste(face(256))
    outside = np.ones(p.image.shape[:2], bool)
    outside[y0:y1, x0:x1] = paste.mask == 0
    assert np.array_equal(out[outside], p.image[outside])


def test_a_session_keeps_one_paste_per_target_until_the_portrait_changes():
    pastes, p, f = Pastes(), Portrait(640), face(256)
    pastes(p, f)
    pastes(p, f, 720)
    pastes(p, torch.from_numpy(f))
    pastes(p, torch.from_numpy(f), 720)
    built = dict(pastes._built)
    assert {t: type(v) for t, v in built.items()} == {
        Target(256): PasteBack, Target(256, None, 720): StreamPaste,
        Target(256, torch.device("cpu")): TorchPasteBack, Target(256, torch.device("cpu"), 720): TorchStreamPaste}
    pastes(p, f, 720)
    assert pastes._built == built and all(pastes._built[t] is built[t] for t in built)  # kept, not rebuilt
    other = Portrait(640)
    pastes(other, f)
    assert list(pastes._built) == [Target(256)] and pastes._built[Target(256)] is not built[Target(256)]


def test_the_frame_path_uses_no_other_modules_private_names():
    """stream/ modules import each other's public names only (stream/encode.py once took paste.py's helpers)."""
    found = []
    for path in sorted(Path(ROOT, "stream").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("stream", "model"):
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert not found


def test_the_full_size_pastes_need_no_codec_stack():
    """The GPU check's paste step runs where av and aiortc are not installed (docs/gpu.md): stream.paste and its
    full-size targets import without them."""
    code = ("import sys; sys.modules.update(av=None, aiortc=None)\n"
            "import numpy as np, torch\n"
            "from stream.paste import PasteBack, TorchPasteBack\n"
            "m = np.array([[1.0, 0, 0], [0, 1.0, 0]])\n"
            "PasteBack(np.zeros((64, 64, 3), np.uint8), m, 32)(np.zeros((32, 32, 3), np.uint8))\n"
            "TorchPasteBack(np.zeros((64, 64, 3), np.uint8), m)(torch.zeros((32, 32, 3), dtype=torch.uint8))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
