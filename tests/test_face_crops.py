"""The Tasks face landmarker against the crops of the mediapipe 0.10.21 tracker it replaced (crop_fixture.json):
same source and driving boxes on every still and clip frame, no more jitter on a still face; and its model file."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import stream.face as face
from conftest import ROOT
from crop_fixture import jitter, still_images, still_noise_frames
from stream.face import DRIVING, SOURCE, FaceModelError, FaceTracker, LiveFaceDriver, crop_params
from stream.serve_bench import moving_face

FIXTURE = json.loads((ROOT / "tests" / "data" / "crop_fixture.json").read_text())
STILLS = still_images()


def assert_same_box(new: np.ndarray, old: list[float], what: str) -> None:
    """Centre within 2% of the box size, size within 3%, angle within 2 degrees."""
    old = np.array(old)
    assert np.hypot(*(new[:2] - old[:2])) <= 0.02 * old[2], (what, new, old)
    assert abs(new[2] / old[2] - 1) <= 0.03, (what, new, old)
    assert abs(np.degrees(new[3] - old[3])) <= 2.0, (what, new, old)


@pytest.fixture(scope="module")
def tracker():
    t = FaceTracker(live=False)
    yield t
    t.close()


def test_fixture_covers_the_test_images():
    assert set(FIXTURE["stills"]) == set(STILLS) and len(FIXTURE["clip"]) == len(moving_face())
    assert all(v["source"] and v["driving"] for v in FIXTURE["stills"].values()) and all(FIXTURE["clip"])


@pytest.mark.parametrize("name", sorted(STILLS))
def test_still_crops_match_the_old_tracker(tracker, name):
    lmk = tracker.landmarks(STILLS[name])
    assert lmk is not None and lmk.shape == (478, 2)
    for crop in ("source", "driving"):
        c = SOURCE if crop == "source" else DRIVING
        assert_same_box(crop_params(lmk, c["scale"], c["vx"], c["vy"]), FIXTURE["stills"][name][crop], crop)


def test_live_clip_crops_match_the_old_tracker():
    """Real frame times, two loops of the clip: the landmarker's own smoothing must not make the box lag."""
    live = FaceTracker(live=True)
    try:
        for i, frame in enumerate(moving_face() * 2):
            lmk = live.landmarks(frame, t=i / 30)
            assert lmk is not None, i
            box = crop_params(lmk, DRIVING["scale"], DRIVING["vx"], DRIVING["vy"])
            assert_same_box(box, FIXTURE["clip"][i % 30], i)
    finally:
        live.close()


def test_still_face_jitter_is_no_worse():
    live = FaceTracker(live=True)
    try:
        centres = [crop_params(live.landmarks(f, t=i / 30), DRIVING["scale"], DRIVING["vx"], DRIVING["vy"])[:2]
                   for i, f in enumerate(still_noise_frames())]
    finally:
        live.close()
    assert jitter(np.stack(centres)) <= FIXTURE["jitter_px"]


def test_live_timestamps_need_not_increase():
    """The landmarker's VIDEO mode rejects a timestamp that does not increase; a repeated frame time, a stream
    restarted at t=0 and frames without a time must all still track."""
    driver = LiveFaceDriver()
    frame = moving_face()[0]
    for t in (0.0, 0.0, 0.5, 0.2, None, None):
        assert driver.process(frame, t).crop is not None, t
    driver.reset()
    assert driver.process(frame, 0.0).crop is not None
    driver.close()


def test_damaged_model_file_fails_clearly(tmp_path, monkeypatch):
    bad = tmp_path / "face_landmarker.task"
    bad.write_bytes(face.MODEL_PATH.read_bytes()[:-1000])
    monkeypatch.setattr(face, "MODEL_PATH", bad)
    face._load_model.cache_clear()
    try:
        with pytest.raises(FaceModelError, match=r"damaged: 3757596 bytes.*expected 3758596 bytes.*--face-model"):
            FaceTracker(live=False)
    finally:
        face._load_model.cache_clear()


def test_face_model_option_loads_another_file(tmp_path):
    copy = tmp_path / "other.task"
    copy.write_bytes(face.MODEL_PATH.read_bytes())
    parser = argparse.ArgumentParser()
    face.add_face_arguments(parser)
    try:
        parser.parse_args(["--face-model", str(tmp_path / "missing.task")])
        with pytest.raises(FaceModelError, match="missing.task.*--face-model"):
            FaceTracker(live=False)
        (tmp_path / "garbage.task").write_bytes(b"not a model")
        parser.parse_args(["--face-model", str(tmp_path / "garbage.task")])
        with pytest.raises(FaceModelError, match="could not be loaded"):
            FaceTracker(live=False)
        parser.parse_args(["--face-model", str(copy)])
        t = FaceTracker(live=False)
        assert t.landmarks(STILLS["astronaut"]).shape == (478, 2)
        t.close()
    finally:
        face.use_face_model(None)


def test_face_stack_imports_without_portaudio_or_display():
    """mediapipe imports sounddevice (PortAudio) and matplotlib.pyplot eagerly; neither may break a headless
    server. PortAudio is hidden by pointing sounddevice's library lookup at nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    code = ("import ctypes.util; ctypes.util.find_library = lambda name: None\n"
            "import stream.face, numpy, mediapipe, sys\n"
            "assert 'sounddevice' not in sys.modules or sys.modules['sounddevice'] is None\n"
            "t = stream.face.FaceTracker(live=True); t.close(); print('ok', numpy.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok 2." in proc.stdout, proc.stderr[-2000:]


def test_launch_takes_face_model_for_every_command(tmp_path):
    import launch
    parser = argparse.ArgumentParser()
    launch.common(parser)
    try:
        assert parser.parse_args(["--face-model", str(tmp_path / "x.task")]).face_model == str(tmp_path / "x.task")
        assert face._model_source == str(tmp_path / "x.task")
    finally:
        face.use_face_model(None)


def test_face_bench_times_the_live_step():
    from stream.face_bench import bench_tracking
    r = bench_tracking(moving_face(4), loops=2)
    assert r["frames"] == 8 and r["found"] == 8 and len(r["ms"]) == 8
    assert 0 < r["median_ms"] <= r["p90_ms"] and r["mediapipe"].startswith("1.") and r["numpy"].startswith("2.")


def test_package_data_carries_the_model_and_its_licence():
    """setuptools installs only .py files unless package-data names the rest: a wheel would track no face."""
    import tomllib
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["stream"]
    shipped = {p for g in globs for p in (ROOT / "stream").glob(g)}
    assert {face.MODEL_PATH, face.MODEL_PATH.parent / "LICENSE.face_landmarker.txt"} <= shipped
