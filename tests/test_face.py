"""Faces: landmarks, crops, ratios, smoothing, paste-back and the live no-face policy, on real photos."""
import cv2
import numpy as np
import pytest
import torch
from skimage import data

from stream.face import (BOX, LEFT_EYE, MOUTH, RIGHT_EYE, FaceTracker, LiveFaceDriver, NoFaceError,
                         crop_driving, crop_face, crop_source, eye_ratio, limit_size, lip_ratio, prepare_source)
from stream.paste import PasteBack, TorchPasteBack, mask_template
from stream.smoothing import OneEuro


@pytest.fixture(scope="module")
def tracker():
    t = FaceTracker()
    yield t
    t.close()


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def canvas(astronaut):
    """Astronaut on a larger black canvas, so moved/rotated/scaled variants keep the whole head."""
    c = np.zeros((800, 900, 3), np.uint8)
    c[150:662, 200:712] = astronaut
    return c


def similarity(img: np.ndarray, angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (tx, ty)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_CUBIC)


def anchors(lmk: np.ndarray) -> np.ndarray:
    """Left eye, right eye and mouth centres."""
    return np.stack([lmk[LEFT_EYE].mean(0), lmk[RIGHT_EYE].mean(0), lmk[MOUTH].mean(0)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))


def roll(crop) -> float:
    """Angle of the crop matrix, degrees."""
    return float(np.degrees(np.arctan2(crop.m_o2c[0, 1], crop.m_o2c[0, 0])))


VARIANTS = {  # name: (edit, expected crop roll from the reference roll a0)
    "shifted": (lambda c: similarity(c, 0, 1.0, -110, 70), lambda a0: a0),
    "rot+15": (lambda c: similarity(c, 15, 1.0, 0, 0), lambda a0: a0 - 15),
    "rot-15": (lambda c: similarity(c, -15, 1.0, 0, 0), lambda a0: a0 + 15),
    "scale0.7": (lambda c: similarity(c, 0, 0.7, 0, 0), lambda a0: a0),
    "scale1.3": (lambda c: similarity(c, 0, 1.3, 0, 0), lambda a0: a0),
    "flipped": (lambda c: np.ascontiguousarray(c[:, ::-1]), lambda a0: -a0),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_source_crop_follows_face(tracker, canvas, name):
    ref = crop_source(canvas, tracker.landmarks(canvas))
    edit, expected_roll = VARIANTS[name]
    img = edit(canvas)
    crop = crop_source(img, tracker.landmarks(img))
    assert crop.image.shape == (512, 512, 3) and crop.image_256.shape == (256, 256, 3)
    # eyes and mouth land on the same crop pixels whatever the face's position, size and roll
    assert np.abs(anchors(crop.lmk) - anchors(ref.lmk)).max() < 4.0
    assert roll(crop) == pytest.approx(expected_roll(roll(ref)), abs=2.0)
    # and the crop itself looks the same (a crop off by ~20 px scores ~11 dB)
    same = ref.image[:, ::-1] if name == "flipped" else ref.image
    assert psnr(crop.image[128:448, 128:384], same[128:448, 128:384]) > 22


def test_source_crop_geometry(tracker, canvas):
    img = similarity(canvas, 15, 1.0, 0, 0)
    lmk = tracker.landmarks(img)
    crop = crop_source(img, lmk)
    np.testing.assert_allclose(crop.m_c2o @ crop.m_o2c, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(crop.lmk, lmk @ crop.m_o2c[:2, :2].T + crop.m_o2c[:2, 2], atol=1e-3)
    # rotation on: the eye line is level in the crop
    (lx, ly), (rx, ry), _ = anchors(crop.lmk)
    assert abs(ry - ly) < 0.03 * (rx - lx)
    # square box = scale 2.3 × the larger extent of jaw+brows, its centre 0.125·size above the middle of that extent
    box = crop.lmk[BOX]
    lo, hi = box.min(0), box.max(0)
    assert (hi - lo).max() == pytest.approx(512 / 2.3, abs=0.5)
    np.testing.assert_allclose((lo + hi) / 2, [256, 256 + 0.125 * 512], atol=0.5)
    np.testing.assert_array_equal(crop.image_256, cv2.resize(crop.image, (256, 256), interpolation=cv2.INTER_AREA))


def test_driving_crop_is_axis_aligned(tracker, canvas):
    img = similarity(canvas, 15, 1.0, 0, 0)
    lmk = tracker.landmarks(img)
    crop, src = crop_driving(img, lmk), crop_source(img, lmk)
    assert crop.m_o2c[0, 1] == 0 and crop.m_o2c[1, 0] == 0
    # same box size as measured in the face's own frame, only scale 2.2 instead of 2.3, warped straight to 256²
    assert crop.m_o2c[0, 0] / np.hypot(*src.m_o2c[0, :2]) == pytest.approx(256 / 512 * 2.3 / 2.2, rel=1e-9)
    assert crop.image.shape == (256, 256, 3) and crop.image_256 is crop.image
    # the same picture as the 512² warp resized to 256² (the path before): only resampling differs
    wide = crop_face(img, lmk, 512, 2.2, 0.0, -0.1, rotate=False)
    assert psnr(crop.image, cv2.resize(wide.image, (256, 256), interpolation=cv2.INTER_LINEAR)) > 30


def test_small_face_in_large_photo_is_found(tracker, astronaut):
    """The mesh's short-range detector misses small faces; the full-range fallback must not."""
    big = np.zeros((1400, 1400, 3), np.uint8)
    big[444:956, 444:956] = astronaut
    lmk = tracker.landmarks(big)
    np.testing.assert_allclose(anchors(lmk), anchors(tracker.landmarks(astronaut)) + 444, atol=2.5)


def close_eyes(img: np.ndarray, lmk: np.ndarray) -> np.ndarray:
    """Paint skin over both eyes and draw a lash line between the corners."""
    img = img.copy()
    for idx in (LEFT_EYE, RIGHT_EYE):
        c, w = lmk[idx].mean(0), np.linalg.norm(lmk[idx[0]] - lmk[idx[1]])
        skin = img[int(c[1] + 1.2 * w), int(c[0])].tolist()
        cv2.ellipse(img, tuple(int(v) for v in c), (int(0.8 * w), int(0.45 * w)), 0, 0, 360, skin, -1)
        cv2.line(img, tuple(int(v) for v in lmk[idx[0]]), tuple(int(v) for v in lmk[idx[1]]), (60, 40, 30), 2)
    return img


def stretch_mouth(img: np.ndarray, lmk: np.ndarray, k: float) -> np.ndarray:
    """Scale the mouth region vertically by k about the mouth centre."""
    img = img.copy()
    c, w = lmk[MOUTH].mean(0), np.linalg.norm(lmk[MOUTH[0]] - lmk[MOUTH[1]])
    x0, x1, y0, y1 = int(c[0] - 0.8 * w), int(c[0] + 0.8 * w), int(c[1] - 0.5 * w), int(c[1] + 0.5 * w)
    m = np.array([[1, 0, 0], [0, k, (1 - k) * (c[1] - y0)]])
    img[y0:y1, x0:x1] = cv2.warpAffine(img[y0:y1, x0:x1], m, (x1 - x0, y1 - y0), borderMode=cv2.BORDER_REPLICATE)
    return img


def test_eye_and_lip_ratios_follow_edits(tracker, astronaut):
    lmk = tracker.landmarks(astronaut)
    eye, lip = eye_ratio(lmk), lip_ratio(lmk)
    assert eye.shape == (2,) and lip.shape == (1,)
    assert np.all((eye > 0.25) & (eye < 0.5)) and 0.1 < lip[0] < 0.25  # open eyes, smile with teeth showing
    closed = tracker.landmarks(close_eyes(astronaut, lmk))
    assert np.all(eye_ratio(closed) < 0.6 * eye)
    assert lip_ratio(closed)[0] == pytest.approx(lip[0], abs=0.03)
    assert lip_ratio(tracker.landmarks(stretch_mouth(astronaut, lmk, 2.0)))[0] > 1.5 * lip[0]
    assert lip_ratio(tracker.landmarks(stretch_mouth(astronaut, lmk, 0.6)))[0] < 0.7 * lip[0]


def test_ratios_are_similarity_invariant(tracker, canvas):
    lmk = tracker.landmarks(canvas)
    a = crop_source(canvas, lmk)
    np.testing.assert_allclose(eye_ratio(a.lmk), eye_ratio(lmk), rtol=1e-4)
    np.testing.assert_allclose(lip_ratio(a.lmk), lip_ratio(lmk), rtol=1e-4)


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_no_face_portrait_raises_clear_error(name):
    with pytest.raises(NoFaceError, match="No face found in the portrait.*one clearly visible, front-facing face"):
        prepare_source(getattr(data, name)())


def test_prepare_source_limits_size_and_accepts_rgba(astronaut):
    big = cv2.resize(astronaut, (1501, 1501))
    rgba = np.dstack([big, np.full(big.shape[:2], 255, np.uint8)])
    src = prepare_source(rgba)
    assert src.image.shape == (1280, 1280, 3) and src.crop.image.shape == (512, 512, 3)
    assert limit_size(np.zeros((1001, 1500, 3), np.uint8)).shape == (854, 1280, 3)  # int(854.19), already even
    assert limit_size(np.zeros((1001, 999, 3), np.uint8)).shape == (1000, 998, 3)


def test_mask_template_matches_official_profile():
    m = mask_template()
    assert m.shape == (512, 512) and m.dtype == np.uint8
    assert m[0].max() == 0 and m[:, 0].max() == 0
    assert m[1, 256] == 15 and m[511, 256] == 15 and m[256, 1] == 15
    assert m[16:497, 16:497].min() == 255
    assert m[8, 256] == 127 and m[8, 8] == round(255 - 16 * np.hypot(8, 8))  # ramp and rounded corner


@pytest.fixture(scope="module")
def source(tracker, astronaut):
    img = similarity(astronaut, 10, 1.0, 0, 0)  # a rotated crop, so paste-back has to undo the rotation
    return img, crop_source(img, tracker.landmarks(img))


def test_paste_back_of_unmodified_crop_reproduces_source(source):
    img, crop = source
    mask = cv2.warpAffine(mask_template(), crop.m_c2o[:2], img.shape[1::-1], flags=cv2.INTER_LINEAR) / 255.0
    inside, outside = mask > 0.99, mask == 0
    assert inside.sum() > 20000
    out = PasteBack(img, crop.m_c2o)(crop.image)
    out_t = TorchPasteBack(img, crop.m_c2o)(torch.from_numpy(crop.image)).numpy()
    for o in (out, out_t):
        assert o.shape == img.shape and o.dtype == np.uint8
        assert psnr(o[inside], img[inside]) >= 40
        np.testing.assert_array_equal(o[outside], img[outside])


@pytest.mark.parametrize("size", [512, 256])
def test_torch_paste_back_matches_numpy(source, size):
    img, crop = source
    rng = np.random.default_rng(0)
    face = cv2.resize(crop.image, (size, size), interpolation=cv2.INTER_AREA)
    face = np.clip(face.astype(int) + rng.integers(-40, 40, face.shape), 0, 255).astype(np.uint8)  # not the source
    out = PasteBack(img, crop.m_c2o, size)(face)
    out_t = TorchPasteBack(img, crop.m_c2o)(torch.from_numpy(face)).numpy()
    diff = np.abs(out.astype(int) - out_t)
    assert diff.max() <= 3 and diff.mean() < 0.3
    assert np.abs(out.astype(int) - img).mean() > 1  # the face really was pasted


def test_one_euro_removes_jitter_with_small_lag():
    rng = np.random.default_rng(0)
    f = OneEuro(min_cutoff=0.5, beta=0.05)
    still = 300 + rng.normal(0, 1.0, (300, 4))  # (cx, cy, size, angle)-like track, 1 px jitter at 30 fps
    smooth = np.stack([f(x) for x in still])
    assert still[30:].var(0).mean() > 5 * smooth[30:].var(0).mean()
    for speed in (1.0, 3.0, 10.0):  # px per frame
        f.reset()
        ramp = speed * np.arange(120.0)[:, None] * np.ones(4)
        lag = (ramp - np.stack([f(x) for x in ramp]))[60:] / speed
        assert 0 < lag.mean() < 2.0
    f.reset()
    np.testing.assert_array_equal(f(np.full(4, 7.0)), np.full(4, 7.0))  # first sample after reset passes through


def test_live_driver_holds_then_eases_to_reference_and_back(tracker, astronaut):
    face = np.full((480, 640, 3), 90, np.uint8)
    face[:, 80:560] = cv2.resize(astronaut, (480, 480))
    empty = np.full((480, 640, 3), 90, np.uint8)
    driver = LiveFaceDriver(hold=3, ease=4)
    seq = [face] * 4 + [empty] * 9 + [face] * 5
    frames = [driver.process(f, t=i / 30) for i, f in enumerate(seq)]
    driver.close()
    w = np.array([f.weight for f in frames])
    np.testing.assert_allclose(w[:7], 1.0)  # tracking, then holding for 3 frames
    assert np.all(np.diff(w[6:11]) < 0) and w[10] == 0 and np.all(w[10:13] == 0)  # 4-frame ease, then reference
    assert np.all(np.diff(w[12:17]) > 0) and w[16] == 1 and w[17] == 1  # eases back in when the face returns
    for f, img in zip(frames, seq):
        assert (f.crop is None) == (img is empty) and (f.eye is None) == (img is empty)
    good = [f for f in frames if f.crop is not None]
    for f in good:
        assert f.crop.image_256.shape == (256, 256, 3) and f.crop.m_o2c[0, 1] == 0
        assert f.eye.shape == (2,) and f.lip.shape == (1,)
    # a still face gives a still crop, and the crop matches the one-shot driving crop
    centres = np.stack([f.crop.m_c2o[:2, 2] for f in good])
    assert np.ptp(centres, 0).max() < 3
    ref = crop_driving(face, tracker.landmarks(face))
    np.testing.assert_allclose(good[3].crop.m_c2o[:2, 2], ref.m_c2o[:2, 2], atol=3)  # crop corner, px
    assert good[3].crop.m_o2c[0, 0] == pytest.approx(ref.m_o2c[0, 0], rel=0.02)  # crop scale
