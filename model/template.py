"""Motion templates: the driving motion of a clip without its face, in the official `.pkl` format (SPEC §4.9).

A template is a pickled dict: `n_frames`, `output_fps`, `motion` (one dict per frame: `scale` (1,1), `R` (1,3,3),
`exp` (1,21,3), `t` (1,3), `kp` (1,21,3), `x_s` (1,21,3), float32), `c_eyes_lst` ((1,2) per frame) and `c_lip_lst`
((1,1) per frame). Older templates name them `R_d`, `c_d_eyes_lst` and `c_d_lip_lst`; animal templates have no
ratio lists. Both load.

A `.pkl` from a user must never run code: unpickling calls whatever globals the file names. `load` reads with an
unpickler that resolves only the few numpy constructors an array needs (and `_codecs.encode`, which protocol-2
pickles use for bytes); any other global is refused before it is called, and what loads is then checked for the
template's layout, shapes and dtypes.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import kinematics as kin

MAX_BYTES = 256 * 1024 * 1024  # ~1.5 kB a frame: over a day of motion at 30 fps
MOTION = {"scale": (1, 1), "R": (1, 3, 3), "exp": (1, 21, 3), "t": (1, 3), "kp": (1, 21, 3), "x_s": (1, 21, 3)}


class TemplateError(ValueError):
    """A file that is not a usable motion template; the message says why, in words meant for the user."""


def _allowed() -> dict[tuple[str, str], object]:
    """The only globals a template's pickle may name: how numpy 1.x and 2.x pickle arrays, dtypes and scalars."""
    from numpy._core import multiarray, numeric
    import _codecs
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _codecs.encode}
    for core in ("numpy.core", "numpy._core"):
        allowed |= {(f"{core}.multiarray", "_reconstruct"): multiarray._reconstruct,
                    (f"{core}.multiarray", "scalar"): multiarray.scalar,
                    (f"{core}.numeric", "_frombuffer"): numeric._frombuffer}
    return allowed


class _Unpickler(pickle.Unpickler):
    ALLOWED = _allowed()

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise TemplateError(f"This .pkl is not a motion template: it refers to {module}.{name}, which a template "
                                "never contains. It was not loaded (nothing in it was run).") from None

    def persistent_load(self, pid):
        raise TemplateError("This .pkl is not a motion template (it refers to external objects). It was not loaded.")


@dataclass
class Template:
    """A clip's motion, frames stacked: scale (N,1), R (N,3,3), exp/kp/x_s (N,21,3), t (N,3), float32; eyes (N,2) and
    lip (N,1) open ratios of the driving face (None in animal templates); fps of the clip."""
    fps: float
    scale: np.ndarray
    R: np.ndarray
    exp: np.ndarray
    t: np.ndarray
    kp: np.ndarray
    x_s: np.ndarray
    eyes: np.ndarray | None = None
    lip: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.R)

    @classmethod
    def from_motion(cls, motion: kin.KpInfo | dict[str, np.ndarray], fps: float, eyes: np.ndarray | None = None,
                    lip: np.ndarray | None = None) -> Template:
        """From M's refined output for N frames (pitch/yaw/roll in degrees, as `kinematics.refine_kp_info` gives)."""
        m = {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in motion.items()}
        rot = kin.rotation_matrix(m["pitch"], m["yaw"], m["roll"])
        f32 = lambda x: np.asarray(x, np.float32)
        return cls(float(fps), f32(m["scale"]).reshape(-1, 1), f32(rot), f32(m["exp"]).reshape(-1, 21, 3),
                   f32(m["t"]).reshape(-1, 3), f32(m["kp"]).reshape(-1, 21, 3), f32(kin.transform_keypoint(m)),
                   None if eyes is None else f32(eyes).reshape(-1, 2), None if lip is None else f32(lip).reshape(-1, 1))

    def kp_info(self, index: slice | int = slice(None)) -> kin.KpInfo:
        """Frames as the engine's motion (B,...) tensors; the rotation matrices as angles
        (kinematics.rotation_angles)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a[index]))
        pitch, yaw, roll = kin.rotation_angles(t(self.R))
        return {"pitch": pitch, "yaw": yaw, "roll": roll, "t": t(self.t), "exp": t(self.exp), "scale": t(self.scale),
                "kp": t(self.kp)}

    def to_dict(self) -> dict:
        """The official layout (current key names)."""
        fps = int(self.fps) if float(self.fps).is_integer() else float(self.fps)
        motion = [{k: np.ascontiguousarray(getattr(self, k)[i:i + 1]) for k in MOTION} for i in range(len(self))]
        d = {"n_frames": len(self), "output_fps": fps, "motion": motion}
        if self.eyes is not None and self.lip is not None:
            d |= {"c_eyes_lst": [self.eyes[i:i + 1].copy() for i in range(len(self))],
                  "c_lip_lst": [self.lip[i:i + 1].copy() for i in range(len(self))]}
        return d

    @classmethod
    def from_dict(cls, d: object) -> Template:
        """Check an unpickled object against the layout (old key names too) and stack it."""
        if not isinstance(d, dict) or not isinstance(d.get("motion"), list) or not d["motion"]:
            raise TemplateError("This .pkl is not a motion template (no per-frame 'motion' list in it).")
        frames = d["motion"]
        arrays: dict[str, list] = {k: [] for k in MOTION}
        for i, f in enumerate(frames):
            if not isinstance(f, dict):
                raise TemplateError(f"Motion template frame {i} is not a dict.")
            f = {**f, "R": f.get("R", f.get("R_d"))}
            for k, shape in MOTION.items():
                a = f.get(k)
                if a is None and k == "x_s":
                    continue
                if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.size != int(np.prod(shape)):
                    raise TemplateError(f"Motion template frame {i}: {k!r} is missing or not a float array of shape "
                                        f"{shape}.")
                arrays[k].append(a.reshape(shape).astype(np.float32))
        stack = {k: np.concatenate(v) if v else None for k, v in arrays.items()}
        if stack["x_s"] is None or len(stack["x_s"]) != len(frames):  # recomputed: it is a function of the rest
            x = kin.compose(*(torch.from_numpy(stack[k]) for k in ("kp", "R", "exp", "scale", "t")))
            stack["x_s"] = x.numpy()
        ratios = []
        for new, old, width in (("c_eyes_lst", "c_d_eyes_lst", 2), ("c_lip_lst", "c_d_lip_lst", 1)):
            lst = d.get(new, d.get(old))
            if lst is None:
                ratios.append(None)
                continue
            if not isinstance(lst, list) or len(lst) != len(frames) or \
                    not all(isinstance(a, np.ndarray) and a.size == width and a.dtype.kind == "f" for a in lst):
                raise TemplateError(f"Motion template: {new!r} must hold one ({width}) float array per frame.")
            ratios.append(np.concatenate([a.reshape(1, width) for a in lst]).astype(np.float32))
        fps = d.get("output_fps", 25)
        if isinstance(fps, np.ndarray) and fps.size == 1:
            fps = fps.item()
        if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not 0 < float(fps) <= 240:
            raise TemplateError(f"Motion template: output_fps {fps!r} is not a frame rate.")
        return cls(float(fps), **stack, eyes=ratios[0], lip=ratios[1])


def loads(data: bytes) -> Template:
    """Read a template from its bytes, running nothing in them (module docstring)."""
    if len(data) > MAX_BYTES:
        raise TemplateError(f"The motion template is {len(data) / 2**20:.0f} MB; the limit is {MAX_BYTES // 2**20} MB.")
    try:
        obj = _Unpickler(io.BytesIO(data)).load()
    except TemplateError:
        raise
    except Exception as e:  # truncated, not a pickle, a refused construct
        raise TemplateError(f"The file is not a readable motion template ({type(e).__name__}: {e}).") from None
    return Template.from_dict(obj)


def load(path: str | Path) -> Template:
    path = Path(path)
    if path.stat().st_size > MAX_BYTES:
        raise TemplateError(f"{path.name!r} is larger than {MAX_BYTES // 2**20} MB: not a motion template.")
    return loads(path.read_bytes())


def dumps(template: Template) -> bytes:
    return pickle.dumps(template.to_dict(), protocol=4)


def save(template: Template, path: str | Path) -> Path:
    """Write the template in the official layout; the official code (and older versions of it) reads it."""
    path = Path(path)
    path.write_bytes(dumps(template))
    return path


class MotionLog:
    """Frames' driving motion as the engine saw it (the dicts a `Work.motion` gets: KP keys, plus `eyes` (2,) and
    `lip` (1,) open ratios), collected into a template: a render's --save-template, a live recording's take."""

    def __init__(self):
        self.frames: list[dict] = []

    def __len__(self) -> int:
        return len(self.frames)

    def append(self, motion: dict) -> None:
        self.frames.append(motion)

    def template(self, fps: float) -> Template:
        keys = ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")
        stacked = {k: np.concatenate([np.asarray(f[k], np.float32) for f in self.frames]) for k in keys}
        ratios = lambda k, w: np.stack([np.asarray(f.get(k) if f.get(k) is not None else np.zeros(w),
                                                   np.float32).reshape(w) for f in self.frames])
        return Template.from_motion(stacked, fps, ratios("eyes", 2), ratios("lip", 1))
