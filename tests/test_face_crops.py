"""The face trackers against the crops of the mediapipe 0.10.21 tracker (crop_fixture.json) and against the Tasks
VIDEO-mode tracker the live tracker replaced (live_baseline.json, tests/face_clips.py): same source and driving
boxes on every still and clip frame, no more jitter on a still face, no larger errors on a fast clip, no face lost on
real faces where the Tasks tracker kept it; and the model file."""
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
from face_clips import box_errors, fast_face, real_faces, track, true_boxes
from stream.face import DRIVING, SOURCE, FaceModelError, FaceTracker, LiveFaceDriver, LiveTracker, crop_params
from stream.serve_bench import moving_face

FIXTURE = json.loads((ROOT / "tests" / "data" / "crop_fixture.json").read_text())
BASELINE = json.loads((ROOT / "tests" / "data" / "live_baseline.json").read_text())
STILLS = still_images()


def assert_same_box(new: np.ndarray, old: list[float], what: str) -> None:
    """Centre within 2% of the box size, size within 3%, angle within 2 degrees."""
    old = np.array(old)
    assert np.hypot(*(new[:2] - old[:2])) <= 0.02 * old[2], (what, new, old)
    assert abs(new[2] / old[2] - 1) <= 0.03, (what, new, old)
    assert abs(np.degrees(new[3] - old[3])) <= 2.0, (what, new, old)


@pytest.fixture(scope="module")
def tracker():
    t = FaceTracker()
    yield t
    t.close()


@pytest.fixture(scope="module")
def real_clip():
    return real_faces()


@pytest.fixture
def live():
    t = LiveTracker()
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


def test_live_clip_crops_match_the_old_tracker(live):
    """Two loops of the clip, key frames and flow frames alike."""
    for i, box in enumerate(track(live, moving_face() * 2)):
        assert box is not None, i
        assert_same_box(box, FIXTURE["clip"][i % 30], i)


def test_still_face_jitter_is_no_worse(live):
    centres = np.stack(track(live, still_noise_frames()))[:, :2]
    assert jitter(centres) <= min(FIXTURE["jitter_px"], BASELINE["still_jitter_px"])


def test_fast_clip_box_errors_are_no_worse(tracker, live):
    """±70 px, ±14°, scale 0.8-1.1 at up to ~30 px a frame, sensor noise: no face lost where the Tasks tracker kept
    it, and the 95th percentile of each box error over those frames no larger than its."""
    still, frames = fast_face()
    truth = true_boxes(crop_params(tracker.landmarks(still), DRIVING["scale"], DRIVING["vx"], DRIVING["vy"]))
    new, old = box_errors(track(live, frames), truth), np.array(BASELINE["fast_errors"])
    kept = np.isfinite(old[:, 0])
    assert np.isfinite(new[kept]).all(), np.where(~np.isfinite(new[:, 0]))
    assert np.all(np.percentile(new[kept], 95, axis=0) <= np.percentile(old[kept], 95, axis=0))


def test_real_faces_are_kept_where_the_tasks_tracker_kept_them(live, real_clip):
    found = [box is not None for box in track(live, real_clip)]
    assert len(found) == len(BASELINE["real_found"])
    lost = [i for i, (new, old) in enumerate(zip(found, BASELINE["real_found"])) if old and not new]
    assert not lost


def test_flow_failure_forces_a_key_frame(tracker, live, real_clip):
    """A key frame every `key` frames; a cut to another person mid-run makes the next frame a key frame at once,
    and the landmarks land on the new face."""
    frames = moving_face()
    for frame in frames[:1 + live.key]:
        live.landmarks(frame)
    assert live.since_key == 0  # frames 0 and `key` are key frames
    live.landmarks(frames[1 + live.key])
    assert live.since_key == 1
    other = real_clip[48]  # Grace Hopper, facing the camera
    lmk = live.landmarks(other)
    assert live.since_key == 0
    assert np.abs(lmk - tracker.landmarks(other)).max(1).mean() < 3.0


def test_lost_face_is_found_again(live):
    frame, empty = moving_face()[0], np.full((480, 640, 3), 90, np.uint8)
    assert [live.landmarks(f) is not None for f in (frame, frame, empty, empty, frame)] == [1, 1, 0, 0, 1]


def test_live_timestamps_need_not_increase():
    """Frame times only feed the box filter: a repeated frame time, a stream restarted at t=0 and frames without a
    time must all still track."""
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
            FaceTracker()
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
            FaceTracker()
        (tmp_path / "garbage.task").write_bytes(b"not a model")
        parser.parse_args(["--face-model", str(tmp_path / "garbage.task")])
        with pytest.raises(FaceModelError, match="could not be loaded"):
            FaceTracker()
        parser.parse_args(["--face-model", str(copy)])
        t = FaceTracker()
        assert t.landmarks(STILLS["astronaut"]).shape == (478, 2)
        t.close()
        t = LiveTracker()  # the landmark network alone comes out of the same bundle
        assert t.landmarks(moving_face()[0]).shape == (478, 2)
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
            "t = stream.face.LiveTracker(); t.close(); print('ok', numpy.__version__)")
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
    assert 0 < r["median_ms"] <= r["p95_ms"] and r["mean_ms"] > 0 and r["cpu_ms"] > 0
    assert r["mediapipe"].startswith("1.") and r["ai-edge-litert"] and r["numpy"].startswith("2.")


def test_face_bench_compares_with_another_revision(tmp_path, capsys):
    """--old-rev runs that revision's tracker from a git archive of it, alternating with this tree's, in one run."""
    from stream.face_bench import main
    assert main(["--old-rev", "HEAD", "--rounds", "1", "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["old"]["rev"] == "HEAD" and r["old"]["found"] == r["new"]["found"] == 120
    assert r["ratio_mean"] == r["new"]["mean_ms"] / r["old"]["mean_ms"] and r["ratio_cpu"] > 0
    assert "new / old: mean" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--old-python", sys.executable], "--old-python needs --old-rev"),
                                           (["--old-rev", "no-such-rev"], "--old-rev no-such-rev: fatal: not a valid object name")])
def test_face_bench_bad_flags_fail_clearly(argv, message, capsys):
    from stream.face_bench import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert message in (capsys.readouterr().err + str(e.value.code))


def test_package_data_carries_the_model_and_its_licence():
    """setuptools installs only .py files unless package-data names the rest: a wheel would track no face."""
    import tomllib
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["stream"]
    shipped = {p for g in globs for p in (ROOT / "stream").glob(g)}
    assert {face.MODEL_PATH, face.MODEL_PATH.parent / "LICENSE.face_landmarker.txt"} <= shipped
