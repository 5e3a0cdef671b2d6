"""The inference engine: one object owns the device, precision, the five networks, compiled graphs, static
buffers and every session's source cache. The web and stream layers hand it uint8 crops and get uint8 images.

A frame's path through the engine (`animate` -> `_step`):
    driving crop (B,256,256,3) uint8 -> M -> head pose, expression, scale, translation (kinematics)
    -> relative (or absolute) motion against the session's reference frame, applied to its cached source (only the
       session's animation region; its expression/pose edits on top: model/editing.py)
    -> eye/lip retargeting deltas -> S stitching -> driving multiplier -> W (dense motion, 3-D warp) -> G
    -> (B,S,S,3) uint8 (S = 512 at full size).
The source side (F volume, source keypoints) is computed once per portrait in `set_source`; `_inputs` gathers it,
with the reference motion and the controls, into the step's one named input, `StepInputs`.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from . import editing
from . import kinematics as kin
from .networks import LivePortraitNetworks

log = logging.getLogger("liveportrait.engine")
BUCKETS = (1, 2, 4, 8)  # CUDA-graph batch sizes: a batch is padded up to the next one, larger batches are split
WARMUP = "warm-up"  # the session warmup() drives
# --compile: name -> torch.compile mode. "max-autotune" also benchmarks Triton templates for every conv shape (3-D
# ones included) and runs coordinate-descent tuning: far longer cold than "default". Our own CUDA graphs replace
# Inductor's, hence "-no-cudagraphs".
COMPILE_MODES = {"max-autotune": "max-autotune-no-cudagraphs", "default": None, "off": None}
COMPILE_RECORD = "compile-mode"  # in the compile cache: the mode whose kernels it holds

# Columns of the per-item control tensor: the per-frame step is branch-free, so one compiled graph / CUDA graph
# serves every combination of controls and items with different controls can share a batch.
KP_KEYS = ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")
CONTROLS = ("relative", "stitching", "multiplier", "eye_on", "eye_target", "lip_on", "lip_target")


@dataclass
class Controls(editing.Edits):
    """Live controls of one session. Retargeting targets are eye/lip open ratios (None: off); `region` and the
    editing sliders (Edits) are turned into per-item masks and offsets by model/editing.py."""
    region: str = "all"
    relative: bool = True
    stitching: bool = True
    multiplier: float = 1.0
    eye_target: float | None = None
    lip_target: float | None = None

    def row(self) -> list[float]:
        return [float(self.relative), float(self.stitching), self.multiplier, float(self.eye_target is not None),
                self.eye_target or 0.0, float(self.lip_target is not None), self.lip_target or 0.0]


@dataclass
class Session:
    """Everything that depends only on the source portrait (computed once), plus the reference frame."""
    feature: torch.Tensor          # (1,C,D,H,W) F volume, engine dtype
    source: kin.KpInfo             # (1,...) fp32 motion of the source
    x_s: torch.Tensor              # (1,21,3) fp32 implicit source keypoints
    ratios: torch.Tensor           # (1,3) fp32 source [eye_left, eye_right, lip] open ratios
    reference: kin.KpInfo | None = None
    controls: Controls = field(default_factory=Controls)
    rows: tuple[torch.Tensor, torch.Tensor] | None = None  # the controls as the step takes them, on the device:
    # (1,7) CONTROLS and (1,132) editing rows, rebuilt only when a control changes (set_controls clears them)


class StepInputs(NamedTuple):
    """What the per-frame step takes besides the driving crops, one row per item, on the device. Built by
    `Engine._inputs` only and read by name; a CUDA graph keeps one static copy of it per batch size (`leaves()` is
    the order its buffers are copied in), and torch.compile sees a tuple of tensors and dicts of tensors."""
    feature: torch.Tensor   # (B,C,D,H,W) F volume, engine dtype
    x_s: torch.Tensor       # (B,21,3) implicit source keypoints
    source: kin.KpInfo      # KP_KEYS: the source's motion
    reference: kin.KpInfo   # KP_KEYS: the reference driving frame's motion
    controls: torch.Tensor  # (B,7) CONTROLS columns (`control` reads one)
    ratios: torch.Tensor    # (B,3) source [eye_left, eye_right, lip] open ratios
    edits: torch.Tensor     # (B,132) editing rows (model/editing.py)

    def leaves(self) -> list[torch.Tensor]:
        """Every tensor, in one fixed order: feature, x_s, source and reference by KP_KEYS, controls, ratios, edits."""
        return [self.feature, self.x_s, *[self.source[k] for k in KP_KEYS], *[self.reference[k] for k in KP_KEYS],
                self.controls, self.ratios, self.edits]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StepInputs:
        """The same structure with fn applied to every tensor."""
        return StepInputs(fn(self.feature), fn(self.x_s), {k: fn(self.source[k]) for k in KP_KEYS},
                          {k: fn(self.reference[k]) for k in KP_KEYS}, fn(self.controls), fn(self.ratios),
                          fn(self.edits))


def control(controls: torch.Tensor, name: str) -> torch.Tensor:
    """The (B,1) column `name` of a (B,7) CONTROLS tensor."""
    return controls[:, CONTROLS.index(name), None]


def compile_cache_dir() -> Path:
    """Where torch.compile keeps compiled graphs, kernels and autotuning results between runs: a cold max-autotune
    compile takes minutes, a warm one seconds. $TORCHINDUCTOR_CACHE_DIR if set, else the per-user cache directory;
    Triton's kernels go in its `triton` folder unless $TRITON_CACHE_DIR says otherwise."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "liveportrait-live" / "torch-compile"
    cache = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default)))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    return cache


def use_compile_cache(path: str | Path) -> Path:
    """Keep Inductor's and Triton's caches in `path` from now on in this process (and its children)."""
    path = Path(path).resolve()
    os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = str(path), str(path / "triton")
    return path


def recorded_compile_mode() -> str | None:
    """The compile mode whose kernels the cache holds (written by a warm-up that compiled), or None."""
    try:
        mode = (compile_cache_dir() / COMPILE_RECORD).read_text().strip()
    except OSError:
        return None
    return mode if mode in COMPILE_MODES else None


def default_compile_mode(device: torch.device) -> str:
    """off on a CPU (a cold compile costs a minute for a few % there: docs/benchmarks.md); on CUDA the mode the
    cache already holds, else the cheap "default" (a first start must not spend many minutes autotuning)."""
    return "off" if device.type != "cuda" else recorded_compile_mode() or "default"


class ConfigError(ValueError):
    """A network config that the chosen weights cannot fill; str() is the one line the user is told."""


def load_networks(weights: str | Path | None = None, config: str = "full", seed: int = 1,
                  download: bool = True) -> LivePortraitNetworks:
    """Official checkpoints (weights = a directory, or None for the default locations), or `weights="recipe"`:
    the conformance kit's deterministic untrained weights, FLOP-identical to the real ones."""
    nets = LivePortraitNetworks(config)
    if str(weights) == "recipe":
        return nets.fill_recipe(seed)
    if config != "full":
        raise ConfigError(f"--config {config} runs only with --weights recipe (untrained weights): the official "
                          "weights exist only for the full config")
    from .weights import load_official
    return load_official(nets, weights, download=download)


class Engine:
    def __init__(self, nets: LivePortraitNetworks, device: str | None = None, precision: str | None = None,
                 compile: str | bool | None = None, cuda_graphs: bool | None = None,
                 channels_last: bool | None = None, threads: int | None = None, buckets: Sequence[int] | None = None):
        """`compile`: a COMPILE_MODES name (True = "default", False = "off"; None: default_compile_mode)."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = self.device.type == "cuda"
        self.precision = precision or ("fp16" if cuda else "fp32")
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        self.channels_last = cuda if channels_last is None else channels_last
        self.cuda_graphs = cuda and (cuda_graphs is None or cuda_graphs)
        if cuda_graphs and not cuda:
            log.warning("CUDA graphs need a CUDA device; running without them on %s", self.device)
        # one CUDA graph per bucket keeps capture time and graph memory bounded; eager and compiled-only engines
        # take any batch size as it comes (a CPU engine pads only when asked to)
        self.buckets = tuple(sorted(buckets if buckets is not None else BUCKETS if self.cuda_graphs else ()))
        self.notes: list[str] = []  # what the engine decided, said once (bench and the page show these)
        if not cuda:
            threads = threads or os.cpu_count() or 1
            torch.set_num_threads(threads)
            self.notes.append(f"cpu: {threads} threads, oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}")
        if cuda:  # TF32 would exceed the fp32 conformance budgets
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True
        self.nets = nets.eval().to(self.device)
        self.F, self.M = nets.appearance_feature_extractor, nets.motion_extractor
        self.W, self.G = nets.warping_module, nets.spade_generator
        self.S = nets.stitching_retargeting_module.float()  # the MLPs and all keypoint math stay fp32
        self.G.freeze_spectral_norm()  # in fp32, once: not per frame in the engine's precision
        for m in (self.F, self.M, self.W, self.G):
            m.to(self.dtype)
            if self.channels_last:  # Module.to(memory_format=channels_last) raises on W's and F's 5-D conv weights
                for p in (*m.parameters(), *m.buffers()):
                    if p.dim() in (4, 5):
                        p.data = p.data.contiguous(
                            memory_format=torch.channels_last if p.dim() == 4 else torch.channels_last_3d)
        self.sessions: dict[str, Session] = {}
        self._pinned: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self._graphs: dict[int, tuple] = {}
        if self.cuda_graphs:  # every bucket's graph captures on one side stream into one memory pool
            self._side, self._pool = torch.cuda.Stream(self.device), torch.cuda.graph_pool_handle()
        self._bucket_lock = threading.Lock()  # one bucket compiles / captures at a time (warm_rest's thread)
        self._warm_inputs: tuple[torch.Tensor, StepInputs] | None = None  # warmup()'s batch-1 step inputs
        self.compile_mode = {True: "default", False: "off", None: default_compile_mode(self.device)}.get(
            compile, compile)
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {compile!r}: expected one of {', '.join(COMPILE_MODES)}")
        self._step_fn = self._step if self.compile_mode == "off" else self._compile(self._step)
        # buckets that serve without compiling or capturing first: all of them when there is nothing to prepare
        self._ready = frozenset(() if self.compile_mode != "off" or self.cuda_graphs else self.buckets)

    # ---- configuration ----

    def _compile(self, fn):
        """torch.compile the per-frame step; say why and run eager when it is unavailable. An error inside a CUDA
        graph capture is raised: running eager there would record into a broken capture and hide the error."""
        mode = COMPILE_MODES[self.compile_mode]
        cache = compile_cache_dir()
        try:
            compiled = torch.compile(fn, mode=mode, dynamic=False)
        except Exception as e:  # no compiler toolchain, unsupported platform or Python
            return self._eager_fallback(fn, e)

        def run(*args):
            nonlocal compiled
            try:
                return compiled(*args)
            except Exception as e:  # first call compiles: a failure there also falls back, once
                if _capturing():
                    raise
                compiled = self._eager_fallback(fn, e)
                return compiled(*args)
        self.notes.append(f"torch.compile on ({self.compile_mode} mode, cache {cache})")
        return run

    def _eager_fallback(self, fn, err: Exception):
        msg = f"torch.compile unavailable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); running eager"
        log.warning(msg)
        self.notes.append(msg)
        return fn

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _upload(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 (B,256,256,3) -> the device, through a pinned host buffer per batch size on CUDA."""
        crops = np.ascontiguousarray(crops if crops.ndim == 4 else crops[None])
        if crops.shape[1:] != (256, 256, 3) or crops.dtype != np.uint8:
            raise ValueError(f"crops must be (B,256,256,3) uint8, got {crops.shape} {crops.dtype}")
        host = torch.from_numpy(crops)
        if self.device.type != "cuda":
            return host
        if len(crops) not in self._pinned:
            self._pinned[len(crops)] = torch.empty(host.shape, dtype=torch.uint8).pin_memory(), torch.cuda.Event()
        buf, copied = self._pinned[len(crops)]
        copied.synchronize()  # the last copy out of this buffer may still be in flight (as_tensor=True never syncs)
        out = buf.copy_(host).to(self.device, non_blocking=True)
        copied.record()
        return out

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A small host tensor -> the device without a host sync: pinned, asynchronous (the caching host allocator
        keeps the pinned copy until the transfer is done)."""
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _to_input(self, u8: torch.Tensor) -> torch.Tensor:
        x = (u8.permute(0, 3, 1, 2).to(self.dtype) / 255).clamp(0, 1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def _motion(self, x: torch.Tensor) -> kin.KpInfo:
        with self._autocast():
            raw = self.M(x)
        return kin.refine_kp_info({k: v.float() for k, v in raw.items()})

    # ---- the source side: once per portrait ----

    @torch.inference_mode()
    def set_source(self, crop: np.ndarray, session: str = "default",
                   ratios: Sequence[float] | None = None) -> None:
        """Compute and cache the portrait's F volume and keypoints. `ratios` = the source's [eye_left, eye_right,
        lip] open ratios for retargeting. Replaces the session's cache; keeps its controls and reference."""
        x = self._to_input(self._upload(crop))
        with self._autocast():
            feature = self.F(x).to(self.dtype)
        source = self._motion(x)
        old = self.sessions.get(session)
        self.sessions[session] = Session(
            feature=feature, source=source, x_s=kin.transform_keypoint(source),
            ratios=self._to_device(torch.tensor([list(ratios) if ratios is not None else [0.3, 0.3, 0.0]])),
            reference=old.reference if old else None, controls=old.controls if old else Controls())

    @torch.inference_mode()
    def set_reference(self, crop: np.ndarray | None, session: str = "default") -> None:
        """The neutral driving frame relative motion is measured against; None: the next frame becomes it."""
        self.sessions[session].reference = None if crop is None else self._motion(self._to_input(self._upload(crop)))

    def set_controls(self, session: str = "default", **controls) -> None:
        s = self.sessions[session]
        for k, v in controls.items():
            if not hasattr(Controls, k):
                raise TypeError(f"unknown control {k!r}")
            setattr(s.controls, k, editing.check(k, v))
            s.rows = None  # rebuilt on the session's next frame

    def close(self, session: str) -> None:
        """Free a session's cache (its GPU memory returns to the allocator)."""
        self.sessions.pop(session, None)

    @property
    def ready_buckets(self) -> frozenset[int]:
        """Batch sizes that serve now without compiling or capturing first."""
        return self._ready

    def first_buckets(self) -> list[int]:
        """What serving needs first: batch 1 and the largest bucket (any batch fits it, padded or in chunks)."""
        return sorted({self.buckets[0], self.buckets[-1]}) if self.buckets else [1]

    def warmup(self, batch_sizes: Sequence[int] | None = None) -> dict[int, float]:
        """Compile and capture now what a first frame would otherwise wait minutes for: `first_buckets()` unless
        told otherwise (warm_rest() does the others off the serving path), logging a progress line per size.
        Returns seconds per batch size. A warm-up that compiled records the mode in the compile cache."""
        sizes = list(batch_sizes or self.first_buckets())
        crop = np.full((256, 256, 3), 128, np.uint8)  # any image: compiled code and graphs depend on shapes only
        with torch.inference_mode():
            self.set_source(crop, WARMUP)
            self.set_reference(crop, WARMUP)
            session = self.sessions.pop(WARMUP)
            self._warm_inputs = self._upload(crop).clone(), self._inputs([session])
        took: dict[int, float] = {}
        for i, b in enumerate(sizes, 1):
            log.info("warm-up %d/%d: compiling and capturing batch %d ...", i, len(sizes), b)
            took[b] = self._warm(b)
            log.info("warm-up %d/%d: batch %d ready in %.1f s", i, len(sizes), b, took[b])
        if self.compile_mode != "off" and not any("torch.compile unavailable" in n for n in self.notes):
            try:
                (compile_cache_dir() / COMPILE_RECORD).write_text(self.compile_mode + "\n")
            except OSError as e:
                log.warning("could not record the compile mode in the cache: %s", e)
        return took

    def warm_rest(self) -> threading.Thread:
        """Compile and capture the buckets warmup() left, one at a time on a background thread: until one is
        ready, its batches are padded up to a ready bucket (the largest always is), so serving never waits."""
        if self._warm_inputs is None:
            raise RuntimeError("warm_rest() follows warmup()")
        rest = [b for b in self.buckets if b not in self._ready]

        def run() -> None:
            for b in rest:
                try:
                    log.info("background warm-up: batch %d ready in %.1f s", b, self._warm(b))
                except Exception:  # that bucket then prepares on first use, as without a warm-up
                    log.exception("background warm-up of batch %d failed", b)
        thread = threading.Thread(target=run, name="engine-warm-rest", daemon=True)
        thread.start()
        return thread

    @torch.inference_mode()
    def _warm(self, b: int) -> float:
        """Seconds to make batch size b ready (compile, capture) from warmup()'s inputs repeated b times."""
        frames, inputs = self._warm_inputs
        rep = lambda t: t.repeat(b, *[1] * (t.dim() - 1))
        start = time.perf_counter()
        self._run_bucket(rep(frames), inputs.map(rep))
        _sync(self.device)
        return time.perf_counter() - start

    # ---- the per-frame step ----

    @torch.inference_mode()
    def animate(self, crops: np.ndarray, sessions: Sequence[str] | None = None,
                as_tensor: bool = False, motion: bool = False):
        """Animate B driving crops (B,256,256,3) uint8, item i driving sessions[i] (default: the "default"
        session for every item). Returns (B,S,S,3) uint8, or the device tensor of it with as_tensor=True (for
        paste-back on the GPU); with motion=True, (images, the driving motion M found in the crops: KP_KEYS host
        arrays), which is what a motion template keeps."""
        crops = crops if crops.ndim == 4 else crops[None]
        names = list(sessions) if sessions is not None else ["default"] * len(crops)
        assert len(names) == len(crops), "one session per crop"
        for crop, name in zip(crops, names):  # the first frame a session sees becomes its reference
            if self.sessions[name].reference is None:
                self.set_reference(crop, name)
        real = len(crops)
        if self.buckets and real > self.buckets[-1]:  # more than the largest graph takes: in chunks of it
            m = self.buckets[-1]
            outs = [self.animate(crops[i:i + m], names[i:i + m], as_tensor=as_tensor, motion=True)
                    for i in range(0, real, m)]
            out = torch.cat([o for o, _ in outs]) if as_tensor else np.concatenate([o for o, _ in outs])
            return (out, {k: np.concatenate([kp[k] for _, kp in outs]) for k in KP_KEYS}) if motion else out
        if pad := self._bucket(real) - real:  # fill the bucket with copies of item 0:
            crops, names = np.concatenate([crops, np.repeat(crops[:1], pad, 0)]), names + names[:1] * pad
            # items never mix (eval-mode norms are per item), so pads cannot change the real items' outputs
        out, kp = self._run_bucket(self._upload(crops), self._inputs([self.sessions[n] for n in names]))
        out = out[:real] if as_tensor else out[:real].cpu().numpy()
        return (out, unpack_motion(kp[:real])) if motion else out

    def _bucket(self, real: int) -> int:
        """The batch size to run `real` items at: the smallest ready bucket that fits, else the smallest bucket
        that fits (prepared now), else `real` itself (no buckets)."""
        fits = [b for b in self.buckets if b >= real]
        return min((b for b in fits if b in self._ready), default=fits[0] if fits else real)

    def _inputs(self, items: list[Session]) -> StepInputs:
        """The step's inputs for these sessions, concatenated on the device (no host transfer but a session's
        changed control rows)."""
        for s in items:
            if s.rows is None:
                rows = self._to_device(torch.cat([
                    torch.tensor([s.controls.row()]), editing.expand([s.controls.region], [s.controls])], 1))
                s.rows = rows[:, :len(CONTROLS)], rows[:, len(CONTROLS):]
        cat = lambda get: torch.cat([get(s) for s in items])
        return StepInputs(feature=cat(lambda s: s.feature), x_s=cat(lambda s: s.x_s),
                          source={k: cat(lambda s: s.source[k]) for k in KP_KEYS},
                          reference={k: cat(lambda s: s.reference[k]) for k in KP_KEYS},
                          controls=cat(lambda s: s.rows[0]), ratios=cat(lambda s: s.ratios),
                          edits=cat(lambda s: s.rows[1]))

    # ---- driving motion given instead of driving crops (motion templates, driving images, source videos) ----

    @torch.inference_mode()
    def extract_motion(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """M's refined motion of (B,256,256,3) uint8 crops, on the host: pitch/yaw/roll (B,1) degrees, t (B,3),
        exp and kp (B,21,3), scale (B,1)."""
        return {k: v.cpu().numpy() for k, v in self._motion(self._to_input(self._upload(crops))).items()}

    def _device_motion(self, motion: dict) -> kin.KpInfo:
        return {k: torch.as_tensor(np.asarray(motion[k]), dtype=torch.float32, device=self.device) for k in KP_KEYS}

    @torch.inference_mode()
    def set_reference_motion(self, motion: dict, session: str = "default") -> None:
        """Set the reference from motion values (KP_KEYS, batch 1): a template's first frame, or a driving image
        with the official `lip_array` as its expression."""
        self.sessions[session].reference = self._device_motion(motion)

    @torch.inference_mode()
    def animate_motion(self, motion: dict, sessions: Sequence[str], as_tensor: bool = False):
        """Like `animate`, with the driving motion given (KP_KEYS arrays, batch B) instead of crops for M: every
        control applies as to a crop. Eager (offline use); a session without a reference takes item 0's motion."""
        driving = self._device_motion(motion)
        for i, name in enumerate(sessions):
            if self.sessions[name].reference is None:
                self.sessions[name].reference = {k: v[i:i + 1] for k, v in driving.items()}
        out = self._drive(driving, self._inputs([self.sessions[n] for n in sessions]))
        return out if as_tensor else out.cpu().numpy()

    @torch.inference_mode()
    def animate_keypoints(self, x_d: np.ndarray | torch.Tensor, session: str = "default",
                          after: np.ndarray | torch.Tensor | None = None, as_tensor: bool = False):
        """Animate the session's portrait to driving keypoints x_d (1,21,3) composed elsewhere (a source video's
        motion, model/drive.py): the session's retargeting, stitching and multiplier controls, `after` (1,21,3)
        added after stitching (the official source-video eye retargeting), then W and G."""
        s = self.sessions[session]
        tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)
        ctrl = torch.tensor([s.controls.row()], device=self.device)
        out = self._render(tensor(x_d), s.feature, s.x_s, ctrl, s.ratios, None if after is None else tensor(after))
        return out if as_tensor else out.cpu().numpy()

    @torch.inference_mode()
    def eye_delta(self, ratios: Sequence[float], session: str = "default") -> np.ndarray:
        """The eye retargeting MLP's (1,21,3) delta for the session's source keypoints and [left, right, target]."""
        x_s = self.sessions[session].x_s
        r = torch.tensor([list(ratios)], dtype=torch.float32, device=self.device)
        return self.S["retarget_eye"](kin.retarget_input(x_s, r)).view(x_s.shape).cpu().numpy()

    def _run_bucket(self, frames: torch.Tensor, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at this batch size (a CUDA-graph replay); the first at a size compiles and captures it, once,
        whichever thread comes first, and makes it ready to serve."""
        b = frames.shape[0]
        if b not in self._ready or (self.cuda_graphs and b not in self._graphs):
            with self._bucket_lock:
                if self.cuda_graphs and b not in self._graphs:
                    self._capture(frames, inputs)
                out = self._replay(frames, inputs) if self.cuda_graphs else \
                    self._step_fn(self._to_input(frames), inputs)
                self._ready |= {b}  # under the lock: no other thread's update is lost
                return out
        return self._replay(frames, inputs) if self.cuda_graphs else self._step_fn(self._to_input(frames), inputs)

    def _capture(self, frames: torch.Tensor, inputs: StepInputs) -> None:
        """Capture the step for this batch size over static buffers, on the engine's one side stream into its one
        graph memory pool. thread_local: allocations by other threads (serving, paste-back) cannot break it."""
        static_frames, static_inputs = frames.clone(), inputs.map(torch.Tensor.clone)
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cudnn autotune and compile outside the capture
                self._step_fn(self._to_input(static_frames), static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
            static_out = self._step_fn(self._to_input(static_frames), static_inputs)
        self._graphs[frames.shape[0]] = (graph, [static_frames, *static_inputs.leaves()], static_out)
        self.notes.append(f"CUDA graph captured for batch {frames.shape[0]}")

    def _replay(self, frames: torch.Tensor, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy into the batch size's static buffers, replay its graph, copy out the static output."""
        graph, static_in, static_out = self._graphs[frames.shape[0]]
        for dst, src in zip(static_in, [frames, *inputs.leaves()], strict=True):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return tuple(o.clone() for o in static_out)

    def _step(self, x: torch.Tensor, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """M on the driving crops, then `_drive`; also returns the driving motion packed (B,133) (templates)."""
        driving = self._motion(x)
        return self._drive(driving, inputs), torch.cat([driving[k].flatten(1) for k in KP_KEYS], 1)

    def _drive(self, driving: kin.KpInfo, inputs: StepInputs) -> torch.Tensor:
        """Keypoint math -> S -> W -> G for a batch of driving motion; branch-free over the per-item controls."""
        relative = control(inputs.controls, "relative")[:, :, None] > 0
        # the animation region and the editing sliders choose, per item, what enters the official formulas
        edited, rel_d, rel_r, abs_d = editing.select(inputs.source, driving, inputs.reference, inputs.edits)
        rel = kin.relative_motion(edited, rel_d, rel_r)
        absolute = kin.absolute_motion(edited, abs_d)
        return self._render(torch.where(relative, rel, absolute), inputs.feature, inputs.x_s, inputs.controls,
                            inputs.ratios)

    def _render(self, x_d: torch.Tensor, feature: torch.Tensor, x_s: torch.Tensor, controls: torch.Tensor,
                ratios: torch.Tensor, after: torch.Tensor | None = None) -> torch.Tensor:
        """Driving keypoints -> eye/lip retargeting -> stitching (+ `after`) -> multiplier -> W -> G -> uint8."""
        c = functools.partial(control, controls)
        eye = self.S["retarget_eye"](kin.retarget_input(x_s, torch.cat([ratios[:, :2], c("eye_target")], 1)))
        lip = self.S["retarget_mouth"](kin.retarget_input(x_s, torch.cat([ratios[:, 2:], c("lip_target")], 1)))
        x_d = x_d + (c("eye_on") * eye + c("lip_on") * lip).view(x_d.shape)
        stitched = kin.apply_stitching(x_d, self.S["retarget_shoulder"](kin.stitching_input(x_s, x_d)))
        x_d = torch.where(c("stitching")[:, :, None] > 0, stitched, x_d)
        if after is not None:
            x_d = x_d + after
        x_d = kin.apply_multiplier(x_s, x_d, c("multiplier")[:, :, None])
        with self._autocast():
            # keypoints stay fp32: the sampling grids are then fp32 and grid_sample runs in fp32, as officially
            warped = self.W(feature, x_d, x_s)["out"]
            if self.channels_last:
                warped = warped.contiguous(memory_format=torch.channels_last)
            image = self.G(warped)
        # official parse_output: clip, *255, truncate
        return (image.float().clamp(0, 1) * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def unpack_motion(packed: torch.Tensor) -> dict[str, np.ndarray]:
    """`_step`'s packed (B,133) driving motion -> KP_KEYS host arrays (B,1)/(B,3)/(B,21,3)."""
    a, out, i = packed.float().cpu().numpy(), {}, 0
    for k, shape in zip(KP_KEYS, ((1,), (1,), (1,), (3,), (21, 3), (1,), (21, 3))):
        size = int(np.prod(shape))
        out[k], i = a[:, i:i + size].reshape(-1, *shape), i + size
    return out


def _capturing() -> bool:
    """Whether this thread's current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
