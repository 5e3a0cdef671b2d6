"""The device check: one command proves and measures the CUDA path (correctness, speed, start-up, serving).

    python -m model.gpu_check --out DIR                  # on a GPU: full size, designed for 8 min on one H100
    python -m model.gpu_check --out DIR --device cpu     # tiny config, under 2 min (CI runs it)

GPU time is rare and short, so every finished step is kept: DIR/gpu_check.json and DIR/gpu_check.md are rewritten
and flushed after each step, and a run cut off by a timeout leaves the finished steps behind. The JSON's "steps"
maps a step's name to {"status": "pass" | "fail" | "skip", ...figures}; a skip says why. Exit status 1 on any fail.
Needs only torch, numpy, opencv, safetensors and huggingface_hub (docs/gpu.md: how to run it on a bare GPU machine).
Weights are the conformance kit's recipe weights: the real networks and FLOPs, and the golden file's outputs.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import kinematics as kin
from .bench import GOLDEN, _device_name, _engine, _engine_profile, _free, _run, _sync, _time
from .conformance import ANGLE_ABS, CHAINED, IMAGE_SHARE, STAGEWISE, measure, measure_image
from .engine import BUCKETS, Engine
from .images import to_tensor
from .networks import LivePortraitNetworks

log = logging.getLogger("liveportrait.gpu_check")
PSNR_MIN_DB = 40.0  # fp16 against fp32, and batched against single calls in fp16
PASTE_MAX_LEVELS = 3  # torch paste-back against cv2
SERVING_SESSIONS = (1, 4, 8, 16)
NO_COMPILE = "not used: the default engine does not compile on this device"
TAGS = {"src": "input.source_rgb_u8", "drv0": "input.driving0_rgb_u8", "drv": "input.driving_rgb_u8"}


class Skip(Exception):
    """A step that does not apply here; the message says why."""


class Check:
    """State shared by the steps: device, networks, the golden file, the default engine, the report on disk."""

    def __init__(self, args: argparse.Namespace):
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.config = args.config or ("full" if self.cuda else "tiny")
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
        self.cache = Path(tempfile.mkdtemp(prefix="lp-compile-cache-"))  # cold by construction
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache)
        self.report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "command": " ".join([sys.executable, "-m", "model.gpu_check", *sys.argv[1:]]),
                       "device": _device_name(self.device), "config": self.config,
                       "weights": "recipe (untrained, FLOP-identical)", "budget_s": args.budget_s, "steps": {}}

    def nets(self, config: str | None = None) -> LivePortraitNetworks:
        """Recipe networks of a config (built once, kept on the CPU; engines take copies)."""
        config = config or self.config
        if config not in self._nets:
            self._nets[config] = LivePortraitNetworks(config).fill_recipe(self.seed)
        return self._nets[config]

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

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
    """What ran: Python, torch, CUDA, cuDNN, GPU, driver, libraries, the commit."""
    import cv2
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "device": _device_name(c.device), "config": c.config, "compile_cache": str(c.cache),
            "commit": _commit()}
    if c.cuda:
        props = torch.cuda.get_device_properties(c.device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=props.name,
                    capability=f"{props.major}.{props.minor}", gpu_memory_gb=props.total_memory / 2 ** 30,
                    driver=_driver())
    return {"status": "pass", **info}


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
    face_t = torch.from_numpy(face).to(c.device).permute(2, 0, 1)[None].float() / 255
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
    """The cold start the app makes: the default engine for the device, warmed up (compile and capture every
    bucket) with an empty compile cache, then a new session's first frame. Later steps use this engine."""
    figures, c.engine = start(c.nets(), c.device, c.images, c.deadline)
    c.cold = figures
    fell_back = [n for n in c.engine.notes if "torch.compile unavailable" in n]
    status = "fail" if c.cuda and fell_back else "pass"  # on CUDA the product path is the compiled one
    return {"status": status, "cache": "empty (cold)" if _compiles(c.engine) else NO_COMPILE, **figures}


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
    for j in range(BUCKETS[-1]):
        engine.close(f"s{j}")
    grew = [r["batch"] for r in rows if r.get("reserved_growth_mb", 0) > 0 or r.get("cuda_mallocs", 0) > 0
            or r.get("alloc_retries", 0) > 0]
    return {"status": "fail" if grew else "pass", "allocator_grew_at_batch": grew, "notes": engine.notes,
            "rows": rows}


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
    code = f"from model.gpu_check import _start_child; _start_child({c.config!r}, {c.seed}, {str(c.device)!r})"
    t, env = time.monotonic(), {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(c.cache)}
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).parents[1], timeout=max(30.0, c.left_s()))
    except subprocess.TimeoutExpired:
        raise Skip(f"the warm start did not finish within the time budget ({c.budget_s:.0f} s)") from None
    if proc.returncode:
        return {"status": "fail", "error": proc.stderr[-3000:]}
    warm = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "pass", "cache": "filled by the startup step (warm)" if _compiles(c.engine) else NO_COMPILE,
            "process_wall_s": time.monotonic() - t, **warm,
            "warmup_speedup": c.cold["warmup_s"] / max(warm["warmup_s"], 1e-9)}


def _start_child(config: str, seed: int, device: str) -> None:
    """The warm start's new process: build the networks, start, print the figures as one JSON line."""
    t = time.monotonic()
    with np.load(GOLDEN) as z:
        images = _golden_images(z)
    nets = LivePortraitNetworks(config).fill_recipe(seed)
    nets_s = time.monotonic() - t
    figures = start(nets, torch.device(device), images)[0]
    print(json.dumps({**figures, "nets_s": nets_s, "in_process_s": time.monotonic() - t}))


STEPS: dict[str, Callable[[Check], dict]] = {f.__name__: f for f in (
    environment, conformance_fp32, paste_back, speed_eager, padded_vs_exact, startup, fp16_psnr, batched_vs_single,
    cuda_graph_vs_eager, speed_default, serving, warm_start)}


# ---- helpers of the steps ----

def start(nets: LivePortraitNetworks, device: torch.device, images: dict[str, np.ndarray],
          deadline: float | None = None) -> tuple[dict, Engine]:
    """What the app does at start-up, timed: build the default engine, warm up every bucket (stopping early past
    `deadline`: the rest then compiles on first use), then a new session's first frame and the next one."""
    t = time.perf_counter()
    engine = Engine(copy.deepcopy(nets), device=str(device))
    _sync(device)
    build_s = time.perf_counter() - t
    warmed: dict[int, float] = {}
    for b in engine.buckets or (1,):
        if deadline is not None and time.monotonic() > deadline:
            break
        warmed |= engine.warmup([b])
    frames = []
    for i in range(2):
        t = time.perf_counter()
        if i == 0:
            _with_source(engine, images, "first")
        engine.animate(images["driving"][None], ["first"])
        frames.append(1000 * (time.perf_counter() - t))
    engine.close("first")
    figures = {"build_s": build_s, "warmup_s_per_batch": warmed, "warmup_s": sum(warmed.values()),
               "not_warmed": [b for b in engine.buckets if b not in warmed], "buckets": list(engine.buckets),
               "first_frame_ms": frames[0], "next_frame_ms": frames[1], "precision": engine.precision,
               "notes": engine.notes}
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
            del engine
    return rows


def _compiles(engine: Engine | None) -> bool:
    return engine is not None and any(n.startswith("torch.compile on") for n in engine.notes)


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
        why = s.get("reason") or (s.get("error") or "").split("\n", 1)[0]
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
    c = Check(args)
    chosen = args.steps.split(",") if args.steps else list(STEPS)
    if unknown := set(chosen) - set(STEPS):
        raise SystemExit(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    log.info("device check on %s (config %s), results in %s", c.report["device"], c.config, args.out)
    try:
        for name in (s for s in STEPS if s in chosen):
            t = time.monotonic()
            log.info("step %s ...", name)
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
    p.add_argument("--steps", default=None, help=f"comma list of steps to run (default: all): {', '.join(STEPS)}")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="steps not started by then are skipped with the reason (default 450: designed for a "
                        "whole run within 8 minutes on one H100, not yet measured on a GPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
