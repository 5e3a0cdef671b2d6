"""The device check: proves and measures the CUDA path (correctness, speed, start-up, serving) in two commands
that each fit a short GPU session's 10-minute command (docs/gpu.md has the exact calls and their budgets):

    python -m model.gpu_check --part correctness --cache-dir DIR/cache --out DIR/correctness
    python -m model.gpu_check --part speed --cache-dir DIR/cache --out DIR/speed   # the compile cache now warm
    python -m model.gpu_check --out DIR --device cpu     # every step, tiny config (CI runs it)

GPU time is rare and short, so nothing is lost to a kill: DIR/gpu_check.json and DIR/gpu_check.md are rewritten and
flushed when a step starts ("running", with its start time), as it goes (after each batch size), and when it ends.
The JSON's "steps" maps a step's name to {"status": "pass" | "fail" | "skip" | "running", ...figures}; a skip says
why, and a "running" left behind is the step the run was killed in. Exit status 1 on any fail.
Needs only torch, numpy, opencv, safetensors and huggingface_hub (docs/gpu.md: how to run it on a bare GPU machine).
Weights are the conformance kit's recipe weights: the real networks and FLOPs, and the golden file's outputs.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import kinematics as kin
from .bench import GOLDEN, _device_name, _engine, _engine_profile, _free, _run, _sync, _time
from .conformance import ANGLE_ABS, CHAINED, IMAGE_SHARE, STAGEWISE, measure, measure_image
from .engine import BUCKETS, COMPILE_MODES, Engine, use_compile_cache
from .images import to_tensor
from .networks import LivePortraitNetworks

log = logging.getLogger("liveportrait.gpu_check")
PSNR_MIN_DB = 40.0  # fp16 against fp32, and batched against single calls in fp16
PASTE_MAX_LEVELS = 3  # torch paste-back against cv2
SERVING_SESSIONS = (1, 4, 8, 16)
NO_COMPILE = "not used: --compile off"
SMOKE_TIMEOUT_S = {"cuda": 120.0, "cpu": 900.0}  # the torch.compile smoke test: ~10 s on a GPU machine; a
# cold C++ compile on the 2-core CI VM under load took 60-150 s
PARTS = {"correctness": ("environment", "conformance_fp32", "paste_back", "startup", "fp16_psnr", "batched_vs_single",
                         "cuda_graph_vs_eager"),
         "speed": ("environment", "startup", "speed_default", "speed_eager", "padded_vs_exact", "serving",
                   "warm_start")}
TAGS = {"src": "input.source_rgb_u8", "drv0": "input.driving0_rgb_u8", "drv": "input.driving_rgb_u8"}


class Skip(Exception):
    """A step that does not apply here; the message says why."""


class Check:
    """State shared by the steps: device, networks, the golden file, the default engine, the report on disk."""

    def __init__(self, args: argparse.Namespace):
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.config = args.config or ("full" if self.cuda else "tiny")
        self.compile = args.compile or ("default" if self.cuda else "off")  # the cheap mode: a session is short
        self.out = args.out
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.budget_s = args.budget_s
        with np.load(GOLDEN) as z:
            self.golden = {k: z[k] for k in z.files}
        self.seed = int(self.golden["meta.seed"])
        self.images = _golden_images(self.golden)
        self.frames = 50 if self.cuda else 2  # timed calls per speed row
        self.warmup_calls = 10 if self.cuda else 1
        self._nets: dict[str, LivePortraitNetworks] = {}
        self.engine: Engine | None = None  # the default engine, built by the startup step
        self.cold: dict | None = None  # the startup step's figures, for the warm start to compare with
        self.fp32_image: np.ndarray | None = None  # our full-size fp32 image of the golden frame
        # --cache-dir: kept, so a second run (or command) starts warm; else a temporary one, cold by construction
        self.keep_cache = args.cache_dir is not None
        self.cache = use_compile_cache(args.cache_dir or tempfile.mkdtemp(prefix="lp-compile-cache-"))
        self.cache_files_before = _files(self.cache)
        self.step: str | None = None  # the step running now (progress goes into its entry)
        self.report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "command": " ".join([sys.executable, "-m", "model.gpu_check", *sys.argv[1:]]),
                       "device": _device_name(self.device), "config": self.config, "compile": self.compile,
                       "compile_cache": str(self.cache), "weights": "recipe (untrained, FLOP-identical)",
                       "budget_s": args.budget_s, "steps": {}}

    def nets(self, config: str | None = None) -> LivePortraitNetworks:
        """Recipe networks of a config (built once, kept on the CPU; engines take copies)."""
        config = config or self.config
        if config not in self._nets:
            self._nets[config] = LivePortraitNetworks(config).fill_recipe(self.seed)
        return self._nets[config]

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def begin(self, name: str) -> None:
        """The step's entry, on disk before it does anything: a run killed in it still names it."""
        self.step = name
        self.report["steps"][name] = {"status": "running", "started": _now(), "elapsed_s": 0.0}
        self._started_step = time.monotonic()
        self.write()

    def progress(self, **figures) -> None:
        """Figures so far of the running step (after each batch size), on disk at once."""
        entry = self.report["steps"].get(self.step)
        if entry is not None and entry["status"] == "running":
            entry.update(figures, elapsed_s=time.monotonic() - self._started_step)
            self.write()

    def write(self) -> None:
        """Rewrite the JSON and the markdown, flushed to disk, so a run cut off later keeps what it has."""
        self.report["wall_s"] = time.monotonic() - self.started
        for name, text in (("gpu_check.json", json.dumps(self.report, indent=1, default=str) + "\n"),
                           ("gpu_check.md", markdown(self.report))):
            tmp = self.out / (name + ".tmp")
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.out / name)


def _golden_images(golden) -> dict[str, np.ndarray]:
    return {"source": golden[TAGS["src"]], "reference": golden[TAGS["drv0"]], "driving": golden[TAGS["drv"]]}


def _psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 images; None when identical."""
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return None if mse == 0 else 10 * float(np.log10(255 ** 2 / mse))


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int64) - b)
    return {"max_abs": int(d.max()), "mean_abs": float(d.mean()), "share_differing": float((d != 0).mean()),
            "psnr_db": _psnr(a, b)}


def _flip(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def _cuda_only(c: Check, what: str) -> None:
    if not c.cuda:
        raise Skip(f"{what}: CUDA only (this run is on {c.device})")


def _full_size_only(c: Check) -> None:
    if c.config != "full":
        raise Skip("compares with the golden file's full-size images: needs --config full")


def _with_source(engine: Engine, images: dict[str, np.ndarray], session: str = "golden") -> str:
    """A session driven against the golden frames: their source portrait, their reference frame."""
    engine.set_source(images["source"], session)
    engine.set_reference(images["reference"], session)
    return session


# ---- the steps, in order: cheap and essential first; a run cut off keeps them ----

def environment(c: Check) -> dict:
    """What ran (Python, torch, CUDA, cuDNN, GPU, driver, libraries, the commit), and what torch.compile needs
    before anything compiles: Triton, gcc, Python.h, a writable cache, free GPU memory, then a torch.compile smoke
    test on the device. Each missing piece is one line in `problems`; they fail the step unless --compile off."""
    import cv2
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "device": _device_name(c.device), "config": c.config, "compile": c.compile, "commit": _commit()}
    if c.cuda:
        props = torch.cuda.get_device_properties(c.device)
        free, total = torch.cuda.mem_get_info(c.device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=props.name,
                    capability=f"{props.major}.{props.minor}", gpu_memory_gb=total / 2 ** 30,
                    gpu_free_gb=free / 2 ** 30, driver=_driver())
    problems = []
    for key, (value, problem) in (("triton", _check_triton(c.cuda)), ("gcc", _check_gcc()),
                                  ("python_h", _check_python_h()), ("compile_cache", _check_cache(c.cache))):
        info[key] = value
        problems += [problem] if problem else []
    info["compile_cache_files"] = len(c.cache_files_before)
    if c.cuda and info["gpu_free_gb"] < 8:
        problems.append(f"GPU memory: only {info['gpu_free_gb']:.1f} GiB free of {info['gpu_memory_gb']:.0f} "
                        "(another process holds it): the speed figures need about 8")
    if c.compile == "off":
        info["compile_smoke"] = "not run: --compile off"
    elif problems:
        info["compile_smoke"] = "not run: the toolchain is incomplete"
    else:
        info["compile_smoke"] = smoke = _compile_smoke(c.device, c.compile)
        if "error" in smoke:
            problems.append(f"torch.compile smoke test on {c.device}: {smoke['error']}")
    return {"status": "fail" if problems and c.compile != "off" else "pass", "problems": problems, **info}


@torch.inference_mode()
def conformance_fp32(c: Check) -> dict:
    """Full-size fp32 on the device (TF32 off) against the golden file, within the kit's budgets: each network
    stagewise, then the engine's own path from the three input images (chained)."""
    if c.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    g, dev = c.golden, c.device
    nets = copy.deepcopy(c.nets("full")).to(dev)
    T = lambda k: torch.from_numpy(g[k]).to(dev)
    arrays: dict[str, dict] = {}

    def check(name: str, ours: torch.Tensor, budgets: dict, extra_abs: float = 0.0) -> None:
        arrays[name] = measure(g[name], ours.double().cpu().numpy(), budgets[name.split(".")[0]], extra_abs)

    check("F.feature_3d", nets.appearance_feature_extractor(to_tensor(g[TAGS["src"]]).to(dev)), STAGEWISE)
    for tag, image in TAGS.items():
        raw = nets.motion_extractor(to_tensor(g[image]).to(dev))
        for k, v in raw.items():
            check(f"M.{tag}.raw.{k}", v, STAGEWISE)
        for k, v in kin.refine_kp_info(raw).items():
            check(f"M.{tag}.{k}", v, STAGEWISE, ANGLE_ABS if k in ("pitch", "yaw", "roll") else 0.0)
    check("S.stitch_delta", nets.stitching(kin.stitching_input(T("K.src"), T("K.drv"))), STAGEWISE)
    warped = nets.warping_module(T("F.feature_3d"), T("K.drv"), T("K.src"))
    for k in ("out", "occlusion_map", "deformation"):
        check(f"W.{k}", warped[k], STAGEWISE)
    check("G.out", nets.spade_generator(T("W.out")), STAGEWISE)
    del nets, warped

    engine = Engine(copy.deepcopy(c.nets("full")), device=str(dev), precision="fp32", compile=False,
                    cuda_graphs=False, channels_last=False)
    outs: list[torch.Tensor] = []
    hook = engine.G.register_forward_hook(lambda m, a, out: outs.append(out.float()))
    image = engine.animate(c.images["driving"][None], [_with_source(engine, c.images)])[0]
    hook.remove()
    check("E2E.out", outs[0], CHAINED)
    arrays["E2E.image_u8"] = measure_image(g["E2E.image_u8"], image, IMAGE_SHARE["chained"])
    c.fp32_image = image
    failed = [k for k, r in arrays.items() if not r["ok"]]
    floats = [k for k, r in arrays.items() if "max_limit" in r]
    worst = max(floats, key=lambda k: arrays[k]["max_abs"] / arrays[k]["max_limit"])
    return {"status": "fail" if failed else "pass", **({"tf32": _tf32()} if c.cuda else {}),
            "arrays_checked": len(arrays), "failed": failed, "closest_to_its_limit": {worst: arrays[worst]},
            "image": arrays["E2E.image_u8"], "arrays": arrays}


def paste_back(c: Check) -> dict:
    """The device paste-back (TorchPasteBack) against the cv2 one, on a rotated, scaled face in a 960x720 portrait."""
    import cv2
    from stream.paste import PasteBack, TorchPasteBack
    # a photo-like face (the recipe networks' output is noise, where cv2's fixed-point sampling
    # positions alone move values by up to 6 levels): the golden source portrait at the generator's 512x512
    face = cv2.resize(c.images["source"], (512, 512), interpolation=cv2.INTER_CUBIC)
    portrait = cv2.resize(c.images["source"], (960, 720), interpolation=cv2.INTER_CUBIC)
    a, s = np.deg2rad(12.0), 0.9  # crop (512 px) -> portrait: rotate, scale, move
    m_c2o = np.array([[s * np.cos(a), -s * np.sin(a), 260.0], [s * np.sin(a), s * np.cos(a), 90.0]])
    cpu = PasteBack(portrait, m_c2o, size=face.shape[0])
    dev = TorchPasteBack(portrait, m_c2o, c.device)
    face_t = torch.from_numpy(face).to(c.device)  # (S,S,3) uint8, as the engine returns it
    ref, ours = cpu(face), dev(face_t).cpu().numpy()
    timing = {}
    for name, call in (("cv2_ms", lambda: cpu(face)), ("torch_ms", lambda: dev(face_t))):
        timing[name] = _time(lambda i: call(), 1, 20, 3, c.device)["ms_mean"]
    r = _compare(ours, ref)
    return {"status": "pass" if r["max_abs"] <= PASTE_MAX_LEVELS else "fail", "max_levels": PASTE_MAX_LEVELS,
            "portrait": list(portrait.shape), **r, **timing}


def speed_eager(c: Check) -> dict:
    """Engine variants without compilation at batch 1, 4, 8 (ms/frame, FPS, memory, allocator growth), the image
    against fp32 batch 1, and per-module ms of the eager path."""
    variants = {"cached fp32": dict(precision="fp32", channels_last=False, compile=False, cuda_graphs=False)}
    skipped = []
    if c.cuda:
        variants |= {"fp16": dict(precision="fp16", channels_last=False, compile=False, cuda_graphs=False),
                     "fp16 channels_last": dict(precision="fp16", channels_last=True, compile=False, cuda_graphs=False),
                     "fp16 channels_last cuda_graphs": dict(precision="fp16", channels_last=True, compile=False,
                                                            cuda_graphs=True)}
    else:
        skipped.append("fp16 variants and CUDA graphs: CUDA only")
    rows = _speed_rows(c, {name: lambda b, kw=kw: _engine(c.nets(), c.device, kw, b, c.images)
                           for name, kw in variants.items()})
    profile_kwargs = variants["fp16 channels_last" if c.cuda else "cached fp32"]
    modules = _engine_profile(c.nets(), c.device, profile_kwargs, c.images, 20 if c.cuda else 3)
    return {"status": "pass", "rows": rows, "modules_ms": modules, "skipped": skipped}


def padded_vs_exact(c: Check) -> dict:
    """CUDA graphs for the buckets 1,2,4,8 (a batch padded up) against one graph per exact batch size 1..8: ms per
    call, capture time and graph memory, so the scheduler knows what padding costs. fp16 + channels_last, not
    compiled (8 more max-autotune compiles would not fit the budget); the ratio is what matters."""
    _cuda_only(c, "CUDA graphs")
    kwargs = dict(precision="fp16", channels_last=True, compile=False, cuda_graphs=True)
    sizes, per = list(range(1, BUCKETS[-1] + 1)), {}
    for label, buckets in (("padded", BUCKETS), ("exact", tuple(sizes))):
        _free(c.device)
        engine = Engine(copy.deepcopy(c.nets()), device=str(c.device), buckets=buckets, **kwargs)
        names = [_with_source(engine, c.images, f"s{j}") for j in range(BUCKETS[-1])]
        before = torch.cuda.memory_reserved(c.device)
        capture_s = sum(engine.warmup(list(buckets)).values())
        graphs_mb = (torch.cuda.memory_reserved(c.device) - before) / 2 ** 20
        crops = np.stack([c.images["driving"]] * BUCKETS[-1])
        per[label] = {"capture_s": capture_s, "graphs_reserved_mb": graphs_mb,
                      "ms_per_call": {n: n * _time(lambda i: engine.animate(crops[:n], names[:n]), n, 30, 3,
                                                   c.device)["ms_mean"] for n in sizes}}
        del engine
    rows = [{"batch": n, "padded_to": next(b for b in BUCKETS if b >= n),
             "padded_ms_per_call": per["padded"]["ms_per_call"][n], "exact_ms_per_call": per["exact"]["ms_per_call"][n],
             "padding_overhead_pct": 100 * (per["padded"]["ms_per_call"][n] / per["exact"]["ms_per_call"][n] - 1)}
            for n in sizes]
    return {"status": "pass", "rows": rows,
            **{f"{k}_{f}": v[f] for k, v in per.items() for f in ("capture_s", "graphs_reserved_mb")}}


def startup(c: Check) -> dict:
    """The start the app makes: the default engine for the device in the --compile mode, warmed up (batch 1 and
    the largest bucket), a new session's first frame, then the other buckets on the background thread (as the
    app does while serving). Cold with an empty compile cache, warm with a filled --cache-dir. Later steps use
    this engine."""
    cache = (f"warm: {len(c.cache_files_before)} files from an earlier run" if c.cache_files_before else
             "empty (cold)") if c.compile != "off" else NO_COMPILE
    c.progress(cache=cache)
    figures, c.engine = start(c.nets(), c.device, c.images, c.compile, c.deadline, c.progress)
    c.cold = figures
    fell_back = [n for n in c.engine.notes if "torch.compile unavailable" in n]
    status = "fail" if c.cuda and fell_back else "pass"  # on CUDA the product path is the compiled one
    return {"status": status, "cache": cache, **figures}


def fp16_psnr(c: Check) -> dict:
    """The default fp16 path's image (compiled, CUDA graphs) against fp32 on the golden frames."""
    _cuda_only(c, "fp16 (the CPU path is fp32: no fast fp16 kernels)")
    _full_size_only(c)
    engine = _default_engine(c)
    image = engine.animate(c.images["driving"][None], [_with_source(engine, c.images)])[0]
    engine.close("golden")
    eager = Engine(copy.deepcopy(c.nets()), device=str(c.device), precision="fp16", compile=False,
                   cuda_graphs=False)
    eager_image = eager.animate(c.images["driving"][None], [_with_source(eager, c.images)])[0]
    del eager
    vs_official = _compare(image, c.golden["E2E.image_u8"])
    r = {"default_vs_official_fp32": vs_official, "fp16_eager_vs_official_fp32":
         _compare(eager_image, c.golden["E2E.image_u8"]), "min_psnr_db": PSNR_MIN_DB}
    if c.fp32_image is not None:
        r["default_vs_our_fp32"] = _compare(image, c.fp32_image)
    psnr = vs_official["psnr_db"]
    return {"status": "pass" if psnr is None or psnr >= PSNR_MIN_DB else "fail", **r}


def batched_vs_single(c: Check) -> dict:
    """One call for 4 sessions (different portraits, references, controls) against 4 single calls."""
    engine = _default_engine(c)
    im = c.images
    setup = [("b0", im["source"], im["reference"], {}),
             ("b1", im["reference"], im["driving"], {"multiplier": 0.5, "lip_target": 0.4}),
             ("b2", _flip(im["source"]), _flip(im["reference"]), {"stitching": False, "eye_target": 0.2}),
             ("b3", im["driving"], im["source"], {"relative": False})]
    for name, source, reference, controls in setup:
        engine.set_source(source, name)
        engine.set_reference(reference, name)
        engine.set_controls(name, **controls)
    names = [s[0] for s in setup]
    crops = np.stack([im["driving"], _flip(im["driving"]), im["reference"], im["source"]])
    batch = engine.animate(crops, names)
    singles = np.concatenate([engine.animate(crops[i:i + 1], [n]) for i, n in enumerate(names)])
    for n in names:
        engine.close(n)
    r = _compare(batch, singles)
    distinct = len({x.tobytes() for x in batch})
    if engine.precision == "fp32":
        ok, rule = r["max_abs"] <= 1, "fp32: at most 1 grey level apart"
    else:
        ok, rule = r["psnr_db"] is None or r["psnr_db"] >= PSNR_MIN_DB, f"{engine.precision}: PSNR >= {PSNR_MIN_DB} dB"
    return {"status": "pass" if ok and distinct == 4 else "fail", "rule": rule, "distinct_outputs": distinct,
            "precision": engine.precision, **r}


def cuda_graph_vs_eager(c: Check) -> dict:
    """CUDA-graph replay against running the same (compiled) step directly, at batch 1 and 4."""
    _cuda_only(c, "CUDA graphs")
    engine = _default_engine(c)
    names = [_with_source(engine, c.images, f"g{j}") for j in range(4)]
    rows = []
    for b in (1, 4):
        crops = np.stack([c.images["driving"], c.images["reference"]] * 2)[:b]
        replayed = engine.animate(crops, names[:b])
        engine.cuda_graphs = False  # the reference path: the same step, launched kernel by kernel
        try:
            direct = engine.animate(crops, names[:b])
        finally:
            engine.cuda_graphs = True
        rows.append({"batch": b, **_compare(replayed, direct)})
    for n in names:
        engine.close(n)
    return {"status": "pass" if all(r["max_abs"] <= 1 for r in rows) else "fail", "rows": rows}


def speed_default(c: Check) -> dict:
    """The default engine (the app's) at batch 1, 4, 8: ms/frame, FPS, memory, allocator growth after warm-up
    (no new cudaMalloc segments, no retries, no growth of reserved memory)."""
    engine = _default_engine(c)
    for j in range(BUCKETS[-1]):
        _with_source(engine, c.images, f"s{j}")
    rows = _speed_rows(c, {"default": lambda b: engine})
    syncs = [_host_syncs(engine, c.images, b) for b in (1, BUCKETS[-1])] if c.cuda else \
        "CUDA only: a CPU has no device to wait for"
    c.progress(rows=rows, host_syncs=syncs)
    for j in range(BUCKETS[-1]):
        engine.close(f"s{j}")
    grew = [r["batch"] for r in rows if r.get("reserved_growth_mb", 0) > 0 or r.get("cuda_mallocs", 0) > 0
            or r.get("alloc_retries", 0) > 0]
    return {"status": "fail" if grew else "pass", "allocator_grew_at_batch": grew, "notes": engine.notes,
            "rows": rows, "host_syncs": syncs}


def serving(c: Check) -> dict:
    """The default engine serving 1, 4, 8 and 16 simulated sessions through the app's session scheduler
    (stream/scheduler.py), each fed prepared crops at 30 fps (no face stack, no WebRTC): per-session fps, p95
    latency (submit -> face on the host), the batch sizes the scheduler formed."""
    from stream.serve_bench import simulate  # needs only torch, numpy and OpenCV

    engine = _default_engine(c)
    seconds = 5.0 if c.cuda else 1.0
    crops = [c.images["driving"], c.images["reference"]]
    rows = [simulate(engine, n, seconds, [crops[j % 2] for j in range(n)], warmup=1.0) for n in SERVING_SESSIONS]
    return {"status": "pass", "loop": "session scheduler", "rows": rows}


def warm_start(c: Check) -> dict:
    """The second start: a new process, the same compile cache (now filled): build, warm up, first frame."""
    if c.cold is None:
        raise Skip("needs the startup step (the cold start) in the same run")
    code = (f"from model.gpu_check import _start_child; "
            f"_start_child({c.config!r}, {c.seed}, {str(c.device)!r}, {c.compile!r})")
    t, env = time.monotonic(), dict(os.environ)  # the same compile cache (use_compile_cache set it)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).parents[1], timeout=max(30.0, c.left_s()))
    except subprocess.TimeoutExpired:
        raise Skip(f"the warm start did not finish within the time budget ({c.budget_s:.0f} s)") from None
    if proc.returncode:
        return {"status": "fail", "error": proc.stderr[-3000:]}
    warm = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "pass", "cache": "filled by the startup step (warm)" if c.compile != "off" else NO_COMPILE,
            "process_wall_s": time.monotonic() - t, **warm,
            "warmup_speedup": c.cold["warmup_s"] / max(warm["warmup_s"], 1e-9)}


def _start_child(config: str, seed: int, device: str, compile: str) -> None:
    """The warm start's new process: build the networks, start, print the figures as one JSON line."""
    t = time.monotonic()
    with np.load(GOLDEN) as z:
        images = _golden_images(z)
    nets = LivePortraitNetworks(config).fill_recipe(seed)
    nets_s = time.monotonic() - t
    figures = start(nets, torch.device(device), images, compile)[0]
    print(json.dumps({**figures, "nets_s": nets_s, "in_process_s": time.monotonic() - t}))


STEPS: dict[str, Callable[[Check], dict]] = {f.__name__: f for f in (
    environment, conformance_fp32, paste_back, startup, fp16_psnr, batched_vs_single, cuda_graph_vs_eager,
    speed_default, speed_eager, padded_vs_exact, serving, warm_start)}


# ---- helpers of the steps ----

def start(nets: LivePortraitNetworks, device: torch.device, images: dict[str, np.ndarray], compile: str,
          deadline: float | None = None, progress: Callable[..., None] = lambda **_: None) -> tuple[dict, Engine]:
    """What the app does at start-up, timed: build the default engine, warm up batch 1 and the largest bucket
    (stopping early past `deadline`), a new session's first frame and the next one, then the other buckets on the
    engine's background thread (waited for here until `deadline`). `progress` gets the figures after each size."""
    t = time.perf_counter()
    engine = Engine(copy.deepcopy(nets), device=str(device), compile=compile)
    _sync(device)
    figures: dict = {"build_s": time.perf_counter() - t, "buckets": list(engine.buckets),
                     "precision": engine.precision, "warmup_s_per_batch": {}}
    for b in engine.first_buckets():
        if deadline is not None and time.monotonic() > deadline:
            break
        figures["warmup_s_per_batch"] |= engine.warmup([b])
        progress(**figures)
    warmed = figures["warmup_s_per_batch"]
    frames = []
    for i in range(2):
        t = time.perf_counter()
        if i == 0:
            _with_source(engine, images, "first")
        engine.animate(images["driving"][None], ["first"])
        frames.append(1000 * (time.perf_counter() - t))
    engine.close("first")
    figures.update(warmup_s=sum(warmed.values()), first_frame_ms=frames[0], next_frame_ms=frames[1])
    progress(**figures)
    if warmed and set(engine.buckets) - engine.ready_buckets:  # the rest, as the app warms them while serving
        t, rest = time.perf_counter(), engine.warm_rest()
        while rest.is_alive() and (deadline is None or time.monotonic() < deadline):
            rest.join(timeout=5.0)
            progress(**figures, background_ready=sorted(engine.ready_buckets))
        figures["background_warmup_s"] = time.perf_counter() - t if not rest.is_alive() else None
    figures.update(ready=sorted(engine.ready_buckets), notes=engine.notes,
                   not_ready=[b for b in engine.buckets if b not in engine.ready_buckets])
    return figures, engine


def _default_engine(c: Check) -> Engine:
    """The startup step's engine (running that step first when it was not chosen)."""
    if c.engine is None and "startup" in c.report["steps"]:
        raise Skip("no default engine: the startup step did not build one")
    if c.engine is None:
        c.report["steps"]["startup"] = {**startup(c), "seconds": None}
    return c.engine


def _speed_rows(c: Check, builders: dict[str, Callable[[int], Engine]]) -> list[dict]:
    """bench's timing of each variant at batch 1, 4, 8; the image against the first row's (fp32 batch 1)."""
    rows, ref = [], None
    for name, build in builders.items():
        for b in (1, 4, 8):
            if c.left_s() < 0:
                rows.append({"variant": name, "batch": b, "skipped": "time budget spent"})
                continue
            _free(c.device)
            started = time.perf_counter()
            engine = build(b)
            names = [f"s{j}" for j in range(b)]
            row = _run(name, lambda crops: engine.animate(crops, names), b, c.images, c.frames, c.warmup_calls,
                       c.device, started)
            image = row.pop("image")
            ref = image if ref is None else ref
            rows.append({**row, "dtype": engine.precision, **{f"vs_first_{k}": v for k, v in
                                                              _compare(image, ref).items() if k != "mean_abs"}})
            c.progress(rows=rows)
            del engine
    return rows


def _host_syncs(engine: Engine, images: dict[str, np.ndarray], batch: int, calls: int = 10) -> dict:
    """What makes the host wait for the GPU per animate(as_tensor=True) call, as the scheduler calls it: the
    profiler's CUDA runtime synchronisation calls, and torch's sync debug mode warnings (a synchronising op)."""
    from torch.profiler import ProfilerActivity, profile
    names = [_with_source(engine, images, f"sync{j}") for j in range(batch)]
    crops = np.stack([images["driving"]] * batch)
    engine.animate(crops, names, as_tensor=True)
    _sync(engine.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(calls):
                    engine.animate(crops, names, as_tensor=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        _sync(engine.device)
    for n in names:
        engine.close(n)
    found = Counter(e.name for e in prof.events() if "ynchronize" in e.name)
    found["cudaDeviceSynchronize"] -= 1  # ours, after the calls
    return {"batch": batch, "calls": calls, "per_call": {k: v / calls for k, v in found.items() if v > 0},
            "sync_debug_warnings_per_call": len(caught) / calls,
            "first_warning": str(caught[0].message).splitlines()[0] if caught else None}


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _check_triton(cuda: bool) -> tuple[str | None, str | None]:
    """Triton's version; missing is a problem on CUDA only (Inductor's GPU kernels are Triton's)."""
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist), None
        except importlib.metadata.PackageNotFoundError:
            pass
    return None, ("triton: not installed; torch.compile on CUDA generates Triton kernels (install the triton "
                  "version your torch build names)") if cuda else None


def _check_gcc(cc: str | None = None) -> tuple[str | None, str | None]:
    """The C compiler Triton builds its launcher with (and Inductor's CPU code): $CC, else gcc."""
    cc = cc or os.environ.get("CC") or "gcc"
    path = shutil.which(cc)
    if path is None:
        return None, f"gcc: {cc} not found; Triton and Inductor compile C with it (install gcc, or set $CC)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"gcc: {path} does not run ({e})"
    return f"{path}: {(out.splitlines() or ['?'])[0]}", None


def _check_python_h(include: str | Path | None = None) -> tuple[str | None, str | None]:
    """Python.h, which Triton's launcher and Inductor's CPU code compile against."""
    header = Path(include or sysconfig.get_paths()["include"]) / "Python.h"
    if header.is_file():
        return str(header), None
    return None, (f"Python.h: not in {header.parent}; Triton compiles its launcher against it (install the "
                  f"python{sys.version_info.major}.{sys.version_info.minor}-dev package)")


def _check_cache(path: Path) -> tuple[str | None, str | None]:
    """The compile cache can be written (a read-only one makes every start cold)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        return None, f"compile cache: {path} is not writable ({e.strerror or e}); choose another with --cache-dir"
    return str(path), None


def _compile_smoke(device: torch.device, mode: str) -> dict:
    """torch.compile of a small function on the device, in a new process (bounded: SMOKE_TIMEOUT_S), with the
    check's compile cache: seconds, and Inductor's FX-graph cache hits (a second run with --cache-dir hits)."""
    code = f"from model.gpu_check import _smoke_child; _smoke_child({str(device)!r}, {mode!r})"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=SMOKE_TIMEOUT_S[device.type], cwd=Path(__file__).parents[1])
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {SMOKE_TIMEOUT_S[device.type]:.0f} s"}
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _smoke_child(device: str, mode: str) -> None:
    from torch._dynamo.utils import counters
    t = time.perf_counter()
    fn = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T).sum(1), mode=COMPILE_MODES[mode], dynamic=False)
    x = torch.randn(64, 64, device=device)
    ok = torch.allclose(fn(x), torch.nn.functional.gelu(x @ x.T).sum(1), rtol=1e-3, atol=1e-3)
    _sync(torch.device(device))
    if not ok:
        raise SystemExit("the compiled function's result differs from eager")
    print(json.dumps({"seconds": time.perf_counter() - t, "fx_graph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
                      "fx_graph_cache_miss": counters["inductor"]["fxgraph_cache_miss"]}))


def _tf32() -> dict:
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


def _driver() -> str:
    """The NVIDIA driver version (from the kernel module, else nvidia-smi)."""
    try:
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except OSError:
        pass
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown (no git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


# ---- the report ----

def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 or abs(v) >= 1e4 else f"{v:.2f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_cell(x)}" for k, x in v.items())
    return "—" if v is None else str(v)


def markdown(report: dict) -> str:
    """The report as markdown: a summary table, then each step's figures (lists of rows as tables)."""
    out = [f"# Device check — {report['device']}", "",
           f"{report['date']} · config {report['config']} · weights {report['weights']} · "
           f"wall {report.get('wall_s', 0):.0f} s of a {report['budget_s']:.0f} s budget", "", f"`{report['command']}`",
           "", "| step | status | seconds | why / note |", "|---|---|---|---|"]
    for name, s in report["steps"].items():
        why = s.get("reason") or (s.get("error") or "").split("\n", 1)[0] or "; ".join(s.get("problems", []))
        if s["status"] == "running":
            why = f"started {s['started']}, {s['elapsed_s']:.0f} s in when last written: the run was cut off here"
        out.append(f"| {name} | {s['status']} | {_cell(s.get('seconds'))} | {why} |")
    for name, s in report["steps"].items():
        out += ["", f"## {name}: {s['status']}", ""]
        for k, v in s.items():
            if k in ("status", "seconds", "arrays"):
                continue
            if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
                cols = list(dict.fromkeys(k2 for r in v for k2 in r))
                out += ["", f"{k}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                out += ["| " + " | ".join(_cell(r.get(col)) for col in cols) + " |" for r in v]
                out.append("")
            elif k == "error":
                out += ["```", str(v).strip(), "```"]
            elif k == "problems":
                out += [f"- problem: {line}" for line in v] or ["- problems: none"]
            else:
                out.append(f"- {k}: {_cell(v)}")
        if "arrays" in s:
            out += ["", "| array | max abs | limit | rms | limit | ok |", "|---|---|---|---|---|---|"]
            out += [f"| {a} | {_cell(r['max_abs'])} | {_cell(r.get('max_limit', 1))} | {_cell(r.get('rms'))} | "
                    f"{_cell(r.get('rms_limit'))} | {r['ok']} |" for a, r in s["arrays"].items()]
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run the chosen steps in order, each guarded (a failure is reported, the next step still runs)."""
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = args.steps.split(",") if args.steps else list(PARTS.get(args.part, STEPS))
    if unknown := set(chosen) - set(STEPS):
        print(f"gpu_check: error: unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    c = Check(args)
    log.info("device check on %s (config %s, compile %s, cache %s), results in %s", c.report["device"], c.config,
             c.compile, c.cache, args.out)
    try:
        for name in (s for s in STEPS if s in chosen):
            t = time.monotonic()
            log.info("step %s ...", name)
            c.begin(name)
            try:
                if c.left_s() < 0:
                    raise Skip(f"the time budget ({c.budget_s:.0f} s) is spent; rerun with --steps {name}")
                result = STEPS[name](c)
            except Skip as e:
                result = {"status": "skip", "reason": str(e)}
            except Exception as e:
                log.exception("step %s failed", name)
                result = {"status": "fail", "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
            c.report["steps"][name] = {**result, "seconds": time.monotonic() - t}
            c.write()
            log.info("step %s: %s (%.1f s)", name, result["status"], time.monotonic() - t)
    finally:
        if not c.keep_cache:
            shutil.rmtree(c.cache, ignore_errors=True)
    print(markdown(c.report))
    failed = [n for n, s in c.report["steps"].items() if s["status"] == "fail"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--config", choices=["full", "tiny"], default=None,
                   help="network size of every step but the full-size conformance (default: full on CUDA, tiny on CPU)")
    p.add_argument("--part", choices=[*PARTS, "all"], default="all",
                   help="correctness: environment to cuda_graph_vs_eager; speed: environment, startup (warm with "
                        "--cache-dir), then the speed and serving steps; all (default): every step")
    p.add_argument("--steps", default=None, help=f"comma list of steps to run (overrides --part): {', '.join(STEPS)}")
    p.add_argument("--compile", choices=list(COMPILE_MODES), default=None,
                   help="the default engine's torch.compile mode (default: default on CUDA, the cheap one; off on CPU)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="keep Inductor's and Triton's compile caches here between runs (default: a temporary one, "
                        "deleted at the end: every start cold)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="no step starts after this many seconds, and startup stops warming buckets (default 450; "
                        "the run's length on a GPU is not yet measured)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
