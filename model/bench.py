"""Benchmark: a naive per-frame port (baseline) against the Engine, and what each optimisation buys on its own.

    python launch.py bench --device cpu                       # full size, recipe weights, a few minutes on CPU
    python launch.py bench --device cpu --config tiny         # seconds
    python launch.py bench --batch-sizes 1,4,8 --json out.json  # on a GPU: every variant at each batch size
    python launch.py bench --quick                            # on a GPU: 3 variants, batch 1 and 8, ~3 minutes

Everything runs in one process on the same inputs (the golden file's source, reference and driving frames), so
the rows compare like with like; each variant gets its own copy of the networks (the Engine casts and re-lays
them out in place). Times are per frame (per call / batch), host uint8 in -> host uint8 out.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import kinematics as kin
from .engine import COMPILE_MODES, Engine, _sync, load_networks
from .images import to_image, to_tensor
from .networks import LivePortraitNetworks

log = logging.getLogger("liveportrait.bench")
GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden_1.npz"
VARIANTS = ("cached", "channels_last", "compile", "precision", "cuda_graphs", "optimised")
CPU_COMPILE_OFF = ("off by default on CPU: measured on a 2-core EPYC, a cold compile takes ~69 s (full size) for a "
                   "~7% shorter frame than the cached eager engine, ~53 s for ~10% at tiny size (ask with --variants)")
MODULES = ("F", "M", "W", "G")
# --quick: what a short GPU session can afford (docs/gpu.md): fp32 eager, fp16 eager and the app's engine, each at
# batch 1 and the largest bucket, 30 timed frames after 3 warm-up calls; two compiles in the cheap mode
QUICK = dict(variants="cached,precision,optimised", precision="fp16", batch_sizes="1,8", frames=30, warmup=3)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench sub-command's options (launch.py adds --weights, --config, --device, --no-download)."""
    p.add_argument("--batch-sizes", default=None,
                   help="engine batch sizes, e.g. 1,4 (default: 1 on CPU, 1,4,8 on CUDA); the baseline is batch 1")
    p.add_argument("--frames", type=int, default=None,
                   help="timed calls per variant (default: CUDA 200; CPU 3 at full size, 20 tiny)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls first, the compiling / capturing one included (default: CUDA 20; CPU 1, tiny 3)")
    p.add_argument("--precision", default=None,
                   help="reduced precisions to measure on top of the cached engine, e.g. fp16,bf16 "
                        "(default: those the hardware runs natively)")
    p.add_argument("--variants", default=None,
                   help=f"comma list of {','.join(VARIANTS)} (default: all that apply to the device; compile is "
                        "off by default on CPU); the baseline always runs")
    p.add_argument("--compile", choices=[m for m in COMPILE_MODES if m != "off"], default="default",
                   help="torch.compile mode of the compile and optimised variants (default: default, the cheap one)")
    p.add_argument("--quick", action="store_true",
                   help="fits 3 minutes on a GPU: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                        + " (options given explicitly still win; on a CPU batch 1 and its native precisions)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON report to this file")


# ---- measuring ----

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _memory(device: torch.device) -> dict[str, float]:
    """A snapshot of what memory growth is judged by: RSS on CPU, the caching allocator's counters on CUDA."""
    if device.type != "cuda":
        return {"rss_mb": _rss_mb(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    s = torch.cuda.memory_stats(device)
    return {"max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20,
            "max_reserved_mb": torch.cuda.max_memory_reserved(device) / 2 ** 20,
            "allocated_mb": s.get("allocated_bytes.all.current", 0) / 2 ** 20,
            "reserved_mb": s.get("reserved_bytes.all.current", 0) / 2 ** 20,
            "alloc_retries": s.get("num_alloc_retries", 0), "cuda_mallocs": s.get("segment.all.allocated", 0),
            "allocator_mb_total": s.get("allocated_bytes.all.allocated", 0) / 2 ** 20}


def _memory_report(before: dict, after: dict, frames: int) -> dict[str, float]:
    """Peak use plus the growth across the timed frames (after warm-up nothing should grow)."""
    if "rss_mb" in after:
        return {"peak_mb": after["peak_rss_mb"], "rss_growth_mb": after["rss_mb"] - before["rss_mb"]}
    return {"peak_mb": after["max_allocated_mb"], "peak_reserved_mb": after["max_reserved_mb"],
            "allocated_growth_mb": after["allocated_mb"] - before["allocated_mb"],
            "reserved_growth_mb": after["reserved_mb"] - before["reserved_mb"],
            "alloc_retries": after["alloc_retries"] - before["alloc_retries"],
            "cuda_mallocs": after["cuda_mallocs"] - before["cuda_mallocs"],
            "allocator_mb_per_frame": (after["allocator_mb_total"] - before["allocator_mb_total"]) / frames}


def _time(call: Callable[[int], object], batch: int, frames: int, warmup: int, device: torch.device) -> dict:
    """Per-frame ms over `frames` calls after `warmup` more (the first, compiling call happened in setup)."""
    for i in range(warmup):
        call(i)
    _sync(device)
    before, ms = _memory(device), []
    for i in range(frames):
        t = time.perf_counter()
        call(warmup + i)
        _sync(device)
        ms.append((time.perf_counter() - t) * 1000 / batch)
    return {"ms_mean": float(np.mean(ms)), "ms_p50": float(np.percentile(ms, 50)),
            "ms_p95": float(np.percentile(ms, 95)), "fps": 1000 / float(np.mean(ms)),
            **_memory_report(before, _memory(device), frames)}


def _profile(modules: dict[str, nn.Module], call: Callable[[int], object], frames: int,
             device: torch.device) -> dict[str, float]:
    """ms per frame inside each module (synchronised forward hooks), the rest being S + keypoint math + I/O."""
    spent, start = dict.fromkeys(modules, 0.0), {}

    def pre(name):
        def hook(*_):
            _sync(device)
            start[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(*_):
            _sync(device)
            spent[name] += time.perf_counter() - start[name]
        return hook

    handles = [h for name, m in modules.items()
               for h in (m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name)))]
    try:
        t = time.perf_counter()
        for i in range(frames):
            call(i)
        _sync(device)
        total = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    ms = {k: 1000 * v / frames for k, v in spent.items()}
    return {**ms, "S+kinematics": 1000 * total / frames - sum(ms.values()), "total": 1000 * total / frames}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---- the variants ----

class Baseline:
    """What a naive port of the official wrapper does for every webcam frame: fp32, eager, batch 1, and F and the
    source's M recomputed each frame although the portrait never changes."""

    def __init__(self, nets: LivePortraitNetworks, device: torch.device, source: np.ndarray, reference: np.ndarray):
        self.nets, self.device, self.source = nets.to(device), device, source
        self.reference = self._motion(reference)

    def _motion(self, rgb: np.ndarray) -> kin.KpInfo:
        return kin.refine_kp_info(self.nets.motion_extractor(to_tensor(rgb).to(self.device)))

    @torch.inference_mode()
    def __call__(self, driving: np.ndarray) -> np.ndarray:
        nets, x = self.nets, to_tensor(self.source).to(self.device)
        feature, source = nets.appearance_feature_extractor(x), self._motion(self.source)
        x_s = kin.transform_keypoint(source)
        x_d = kin.relative_motion(source, self._motion(driving), self.reference)
        x_d = kin.apply_multiplier(x_s, kin.apply_stitching(x_d, nets.stitching(kin.stitching_input(x_s, x_d))))
        return to_image(nets.spade_generator(nets.warping_module(feature, x_d, x_s)["out"]))[0]


def _modules(nets: LivePortraitNetworks | Engine) -> dict[str, nn.Module]:
    if isinstance(nets, Engine):
        return dict(zip(MODULES, (nets.F, nets.M, nets.W, nets.G)))
    return dict(zip(MODULES, (nets.appearance_feature_extractor, nets.motion_extractor, nets.warping_module,
                              nets.spade_generator)))


def _plan(args, cuda: bool) -> tuple[dict[str, dict], list[dict]]:
    """Engine variants to run (name -> Engine kwargs) and the ones skipped, with why."""
    base = dict(precision="fp32", channels_last=False, compile=False, cuda_graphs=False)
    wanted = set(args.variants.split(",")) if args.variants else set(VARIANTS) - (set() if cuda else {"compile"})
    if unknown := wanted - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    plan, skipped = {}, []
    if "cached" in wanted:
        plan["cached"] = base
    if "channels_last" in wanted:
        plan["+channels_last"] = {**base, "channels_last": True}
    if "compile" in wanted:
        plan["+compile"] = {**base, "compile": args.compile}
    elif not cuda:
        skipped.append({"variant": "+compile", "reason": CPU_COMPILE_OFF})
    if "precision" in wanted:
        native = _native_precisions(cuda)
        for p in (args.precision.split(",") if args.precision else ("fp16", "bf16")):
            if p != "fp32" and (args.precision or p in native):
                plan[f"+{p}"] = {**base, "precision": p}
            elif p != "fp32":
                where = "this GPU" if cuda else f"this CPU (oneDNN, {torch.backends.cpu.get_cpu_capability()})"
                skipped.append({"variant": f"+{p}", "reason": f"{where} has no native {p} kernels (ask for it with "
                                                              "--precision to measure it anyway)"})
    if "cuda_graphs" in wanted:
        if cuda:
            plan["+cuda_graphs"] = {**base, "cuda_graphs": True}
        else:
            skipped.append({"variant": "+cuda_graphs", "reason": "CUDA graphs: CUDA only"})
    if "optimised" in wanted:  # CPU: fp32 eager on every core (see docs/benchmarks.md for what did not help)
        plan["optimised"] = (dict(precision="fp16", channels_last=True, compile=args.compile, cuda_graphs=True) if cuda
                             else dict(precision="fp32", channels_last=False, compile=False))
    return plan, skipped


def _native_precisions(cuda: bool) -> set[str]:
    """Reduced precisions the hardware runs natively, i.e. fast: on CPU, oneDNN's AVX512-BF16/FP16 or AMX."""
    if cuda:
        return {"fp16"} | ({"bf16"} if torch.cuda.is_bf16_supported() else set())
    mkldnn = torch.ops.mkldnn
    return {p for p, ok in (("fp16", mkldnn._is_mkldnn_fp16_supported), ("bf16", mkldnn._is_mkldnn_bf16_supported))
            if ok()}


def _run(name: str, animate: Callable[[np.ndarray], np.ndarray], batch: int, images: dict[str, np.ndarray],
         frames: int, warmup: int, device: torch.device, started: float) -> dict:
    """Time a built variant; setup_s = since `started` (build, warm-up: compile, capture) through its first call."""
    driving = [images["driving"], images["reference"]]  # alternate; item 0 of call 0 is the golden driving frame
    batches = [np.stack([driving[(i + j) % 2] for j in range(batch)]) for i in range(2)]
    image = animate(batches[0])[0]
    _sync(device)
    return {"variant": name, "batch": batch, "setup_s": time.perf_counter() - started,
            **_time(lambda i: animate(batches[i % 2]), batch, frames, warmup - 1, device), "image": image}


def _engine(nets: LivePortraitNetworks, device: torch.device, kwargs: dict, batch: int,
            images: dict[str, np.ndarray]) -> Engine:
    engine = Engine(copy.deepcopy(nets), device=str(device), **kwargs)
    engine.warmup([batch])  # as the app does at startup: compile and capture before the first frame
    for j in range(batch):
        engine.set_source(images["source"], f"s{j}")
        engine.set_reference(images["reference"], f"s{j}")
    return engine


def _engine_profile(nets: LivePortraitNetworks, device: torch.device, kwargs: dict, images: dict[str, np.ndarray],
                    frames: int) -> dict[str, float]:
    """Per-module ms of the engine's eager path on these settings (hooks see no modules inside a compiled graph
    or a CUDA graph). F is not in the frame: it runs once per portrait, in set_source."""
    engine = _engine(nets, device, {**kwargs, "compile": False, "cuda_graphs": False}, 1, images)
    driving = [images["driving"], images["reference"]]
    engine.animate(driving[0][None], ["s0"])
    ms = _profile(_modules(engine), lambda i: engine.animate(driving[i % 2][None], ["s0"]), frames, device)
    once = _profile(_modules(engine), lambda i: engine.set_source(images["source"], "s0"), 1, device)
    return {**ms, "F": 0.0, "F_per_portrait": once["F"], "set_source": once["total"]}


def apply_quick(args: argparse.Namespace, cuda: bool) -> None:
    """--quick: QUICK's settings for what was not given explicitly (a CPU: batch 1 only, its native precisions)."""
    for k, v in QUICK.items():
        if getattr(args, k) is None and (cuda or k not in ("batch_sizes", "precision")):
            setattr(args, k, v)


def run(args: argparse.Namespace) -> int:
    """Run the plan, print the markdown tables and the JSON report; 0 on success."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda, tiny = device.type == "cuda", args.config == "tiny"
    if args.quick:
        apply_quick(args, cuda)
    frames = args.frames or (200 if cuda else 20 if tiny else 3)
    warmup = max(1, args.warmup or (20 if cuda else 3 if tiny else 1))
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,4,8" if cuda else "1")).split(",")]
    weights = args.weights or os.environ.get("LP_WEIGHTS") or "recipe"
    nets = load_networks(weights, args.config, download=not args.no_download)
    with np.load(GOLDEN) as z:
        images = {k: z[f"input.{k}_rgb_u8"] for k in ("source", "driving")} | {"reference": z["input.driving0_rgb_u8"]}
    plan, skipped = _plan(args, cuda)
    load = os.getloadavg()[0]  # other work on the machine skews every row; the report says how busy it was

    if cuda:  # the baseline is the fp32 reference image: no TF32 (the Engine turns it off too)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    _free(device)
    started, base = time.perf_counter(), copy.deepcopy(nets)
    naive = Baseline(base, device, images["source"], images["reference"])
    rows = [{**_run("baseline", lambda crops: naive(crops[0])[None], 1, images, frames, warmup, device, started),
             "dtype": "fp32", "notes": [f"torch default threads: {torch.get_num_threads()}"]}]
    driving = [images["driving"], images["reference"]]
    modules = {"baseline": _profile(_modules(base), lambda i: naive(driving[i % 2]), min(frames, 3), device)}
    del naive, base
    for name, kwargs in plan.items():
        for batch in batch_sizes:
            _free(device)
            started, engine = time.perf_counter(), None
            try:  # one variant failing (a capture, a kernel missing on this device) must not lose the others
                engine, sessions = _engine(nets, device, kwargs, batch, images), [f"s{j}" for j in range(batch)]
                row = _run(name, lambda crops: engine.animate(crops, sessions), batch, images, frames, warmup,
                           device, started)
                rows.append({**row, "dtype": engine.precision, "notes": engine.notes})
            except Exception as e:
                log.exception("variant %s (batch %d) failed", name, batch)
                skipped.append({"variant": f"{name} (batch {batch})", "reason": f"failed: {type(e).__name__}: {e}"})
            del engine
    if "optimised" in plan:
        _free(device)
        modules["optimised (eager path)"] = _engine_profile(nets, device, plan["optimised"], images, min(frames, 3))

    ref, ref_image = rows[0]["ms_mean"], rows[0]["image"]
    for r in rows:
        diff = r.pop("image").astype(np.float64) - ref_image
        mse = float((diff ** 2).mean())
        r.update(device=_device_name(device), vs_baseline_pct=100 * (1 - r["ms_mean"] / ref),
                 ratio=r["ms_mean"] / ref, max_abs=int(np.abs(diff).max()),
                 psnr_db=None if mse == 0 else 10 * np.log10(255 ** 2 / mse))
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(["python", Path(sys.argv[0]).name, *map(shlex.quote, sys.argv[1:])]),
              "torch": torch.__version__,
              "device": _device_name(device), "config": args.config,
              "weights": "official" if weights != "recipe" else "recipe (untrained, FLOP-identical)",
              "frames": frames, "warmup": warmup, "load_avg_1min": [load, os.getloadavg()[0]], "rows": rows,
              "modules_ms": modules, "skipped": skipped}
    print(markdown(report))
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.exists() else []
    return f"CPU {names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def _fmt(v, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    """The report as markdown: the variants table, per-module ms, memory after warm-up, what was skipped."""
    out = [f"{report['date']} · {report['device']} · torch {report['torch']} · config {report['config']} · "
           f"weights {report['weights']} · {report['frames']} timed frames after {report['warmup']} warm-up · "
           "1-min load average at start/end {:.1f}/{:.1f}".format(*report["load_avg_1min"]),
           f"`{report['command']}`", "",
           "| variant | device | dtype | batch | ms/frame mean | p50 | p95 | FPS | peak memory MB | vs baseline | "
           "ratio variant/baseline | max abs | PSNR dB | setup s |", "|" + "---|" * 14]
    for r in report["rows"]:
        psnr = "identical" if r["psnr_db"] is None and r["max_abs"] == 0 else _fmt(r["psnr_db"])
        out.append(f"| {r['variant']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['ms_mean']:.1f} | "
                   f"{r['ms_p50']:.1f} | {r['ms_p95']:.1f} | {r['fps']:.2f} | {r['peak_mb']:.0f} | "
                   f"{r['vs_baseline_pct']:+.1f}% | {r['ratio']:.3f} | {r['max_abs']} | {psnr} | {r['setup_s']:.1f} |")
    cols = ("F", "M", "S+kinematics", "W", "G", "total")
    out += ["", "Per-module ms per frame (eager, synchronised hooks; S+kinematics = the rest of the frame):", "",
            "| path | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, ms in report["modules_ms"].items():
        f = f"0 (cached; {ms['F_per_portrait']:.1f} once per portrait)" if "F_per_portrait" in ms else None
        out.append(f"| {name} | " + " | ".join(f if c == "F" and f else f"{ms[c]:.1f}" for c in cols) + " |")
    keys = [k for k in report["rows"][0]
            if k.endswith(("reserved_mb", "_growth_mb", "_per_frame", "retries", "mallocs"))]
    out += ["", "Memory across the timed frames (after warm-up):", "",
            "| variant | batch | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    out += [f"| {r['variant']} | {r['batch']} | " + " | ".join(_fmt(r[k], 2) for k in keys) + " |"
            for r in report["rows"]]
    out += ["", "Notes:"] + [f"- {r['variant']} (batch {r['batch']}): {'; '.join(r['notes'])}" for r in report["rows"]]
    out += [f"- skipped {s['variant']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(out) + "\n"
