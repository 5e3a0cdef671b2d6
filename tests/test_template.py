"""Motion templates (.pkl, the official format): the official code's template loads here and equals our motion of
the same frames, ours has its layout, older key names load, and a hostile pickle runs nothing.

tests/data/official_template.pkl and official_motion.npz were made by the official LivePortrait code (commit
1986663) on CPU, fp32, under the conformance kit's seed-1 recipe weights: `make_motion_template` over the six
driving crops stored in the .npz (ratios c_eyes [0.30+0.02i, 0.28+0.01i], c_lip [0.05+0.03i], output_fps 15), its
own `dump`."""
import pickle
from pathlib import Path

import numpy as np
import pytest

from model import template as tpl
from model.conformance import CHAINED, measure
from model.engine import Engine

DATA = Path(__file__).parent / "data"
KEYS = ("scale", "R", "exp", "t", "kp", "x_s")


@pytest.fixture(scope="module")
def official() -> dict:
    with np.load(DATA / "official_motion.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ours(full_nets, official) -> tpl.Template:
    """Our motion of the same driving crops, through the engine, as a template."""
    engine = Engine(full_nets, device="cpu", compile=False)
    n = len(official["driving_crops"])
    eyes = np.array([[0.30 + 0.02 * i, 0.28 + 0.01 * i] for i in range(n)])
    lip = np.array([[0.05 + 0.03 * i] for i in range(n)])
    return tpl.Template.from_motion(engine.extract_motion(official["driving_crops"]), 15, eyes, lip)


def test_official_template_loads_and_equals_our_motion(ours):
    theirs = tpl.load(DATA / "official_template.pkl")
    assert len(theirs) == 6 and theirs.fps == 15
    for k in KEYS:
        r = measure(getattr(theirs, k), getattr(ours, k), CHAINED["M"])
        assert r["ok"], f"{k}: {r}"
    np.testing.assert_allclose(theirs.eyes, ours.eyes, atol=1e-7)
    np.testing.assert_allclose(theirs.lip, ours.lip, atol=1e-7)


def layout(obj):
    """The structure of an unpickled template: types, keys, shapes and dtypes, no values."""
    if isinstance(obj, dict):
        return {k: layout(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [layout(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.shape, str(obj.dtype))
    return type(obj).__name__


def test_our_template_has_the_official_layout(ours, tmp_path):
    official = pickle.loads((DATA / "official_template.pkl").read_bytes())  # our own fixture: trusted
    written = pickle.loads(tpl.save(ours, tmp_path / "ours.pkl").read_bytes())
    assert layout(written) == layout(official)
    back = tpl.load(tmp_path / "ours.pkl")
    for k in KEYS:
        np.testing.assert_array_equal(getattr(back, k), getattr(ours, k))


def test_older_key_names_load(ours):
    d = ours.to_dict()
    old = {"n_frames": d["n_frames"], "output_fps": d["output_fps"], "c_d_eyes_lst": d["c_eyes_lst"],
           "c_d_lip_lst": d["c_lip_lst"],
           "motion": [{("R_d" if k == "R" else k): v for k, v in m.items() if k != "x_s"} for m in d["motion"]]}
    back = tpl.loads(pickle.dumps(old, protocol=2))  # protocol 2: how Python 2-era tools wrote them
    for k in KEYS:
        np.testing.assert_allclose(getattr(back, k), getattr(ours, k), atol=1e-6)  # x_s recomputed
    np.testing.assert_array_equal(back.eyes, ours.eyes)


class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_hostile_pickle_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    hostile = pickle.dumps({"n_frames": 1, "motion": [CreatesAFile(target)]})
    with pytest.raises(tpl.TemplateError, match=r"refers to _?io\.open.*nothing in it was run"):
        tpl.loads(hostile)
    (tmp_path / "hostile.pkl").write_bytes(hostile)
    with pytest.raises(tpl.TemplateError, match="not a motion template"):
        tpl.load(tmp_path / "hostile.pkl")
    assert not target.exists()
    pickle.loads(hostile)  # what a plain unpickler would have done: the file appears
    assert target.exists()


@pytest.mark.parametrize("data, message", [
    (b"not a pickle at all", "not a readable motion template"),
    (pickle.dumps([1, 2, 3]), "no per-frame 'motion' list"),
    (pickle.dumps({"motion": [{"R": np.eye(3)}]}), "'scale' is missing"),
    (pickle.dumps({"motion": [{k: np.zeros(s, np.float32) for k, s in tpl.MOTION.items()}], "output_fps": -3}),
     "not a frame rate"),
])
def test_not_a_template(data, message):
    with pytest.raises(tpl.TemplateError, match=message):
        tpl.loads(data)
