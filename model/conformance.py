"""The conformance kit's fp32 budgets against the official outputs (golden files), shared by the tests and the device
check. An array passes if max|d| <= max_rel*max|g| + 1e-6 and rms(d) <= rms_rel*rms(g) + 1e-6 (plus an absolute
allowance for angles in degrees); the uint8 image may differ by 1 grey level on a small share of values."""
import numpy as np

# group -> (max_rel, rms_rel): each stage fed the golden values of its inputs
STAGEWISE = {"F": (3e-5, 2e-5), "M": (3e-5, 3e-5), "R": (1e-5, 1e-5), "K": (1e-5, 1e-5), "S": (1e-5, 1e-5),
             "REL": (1e-5, 1e-5), "W": (1e-4, 5e-5), "Wsyn": (1e-4, 5e-5), "G": (5e-4, 1e-4), "E2E": (2e-3, 2e-4)}
# everything computed from the three input images
CHAINED = {**{k: (3e-5, 3e-5) for k in ("R", "K", "S", "REL")}, "F": (3e-5, 2e-5), "M": (3e-5, 3e-5),
           "W": (5e-4, 2e-4), "G": (3e-3, 5e-4), "E2E": (5e-3, 1e-3)}
ANGLE_ABS = 5e-4  # degrees, on top of the relative budget
IMAGE_SHARE = {"stagewise": 0.01, "chained": 0.02}  # share of uint8 values allowed to differ, by at most 1


def measure(golden: np.ndarray, ours: np.ndarray, budget: tuple[float, float], extra_abs: float = 0.0) -> dict:
    """max|d| and rms(d) of `ours` against `golden`, their limits under `budget`, and whether both are met."""
    g = golden.astype(np.float64)
    d = np.asarray(ours, np.float64).reshape(g.shape) - g
    max_rel, rms_rel = budget
    rms = lambda x: float(np.sqrt((x ** 2).mean()))
    r = {"max_abs": float(np.abs(d).max()), "max_limit": max_rel * float(np.abs(g).max()) + 1e-6 + extra_abs,
         "rms": rms(d), "rms_limit": rms_rel * rms(g) + 1e-6 + extra_abs}
    return {**r, "ok": r["max_abs"] <= r["max_limit"] and r["rms"] <= r["rms_limit"]}


def measure_image(golden: np.ndarray, ours: np.ndarray, share: float) -> dict:
    """uint8 images: at most 1 grey level apart, on at most `share` of the values."""
    d = ours.astype(np.int64) - golden
    r = {"max_abs": int(np.abs(d).max()), "share_differing": float((d != 0).mean()), "share_limit": share}
    return {**r, "ok": r["max_abs"] <= 1 and r["share_differing"] <= share}
