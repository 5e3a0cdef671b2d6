"""Live-path benchmark: every stage of one session's frame, in one process, per portrait size and codec set-up.

    python launch.py bench live --weights recipe --config tiny --device cpu --json live.json

A 640x480 moving-face webcam clip, encoded as a browser would send it, goes through the real path frame by frame:
decode to RGB (aiortc's decoder), face track + crop (LiveFaceDriver), the engine, paste-back (stream/paste.py's
`Pastes`, as the pipeline's Animator uses it), colour conversion + resize for the encoder, and the encoder
(aiortc's, as its sender calls it, packetisation included). Face, engine and paste-back run once per frame; every
codec set-up then converts and encodes that same output with its own encoder, so all rows come from the same
frames and the same run. The reference row of each portrait is today's path: the full pasted-back image handed to aiortc's VP8
encoder as rgb24.

Each row also has the stream's bitrate and its luma PSNR: every encoded frame is decoded (aiortc's decoder, not
timed) and compared with the Y plane it was sent as, after the first second (rate control settling).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import cv2
import numpy as np
import torch
from aiortc.codecs import H264Decoder, H264Encoder, Vp8Decoder, Vp8Encoder, depayload, get_decoder
from aiortc.codecs.base import Decoder, Encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from stream import encode
from stream.paste import PasteBack, Pastes

log = logging.getLogger("liveportrait.live_bench")
CLOCK = Fraction(1, 90000)
STEP = 90000 // encode.FRAME_RATE  # RTP ticks per frame at 30 fps
OUTSIDE = ("decode", "paste", "convert", "encode")  # the CPU work the target counts (not face, engine)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bench live` options (launch.py adds --weights, --config, --device, --no-download)."""
    p.add_argument("--frames", type=int, default=60, help="measured frames per portrait, after --warmup frames")
    p.add_argument("--warmup", type=int, default=5, help="frames run before measuring")
    p.add_argument("--portraits", default="512,1280", help="portrait sizes (square, the long side), e.g. 512,1280")
    p.add_argument("--stream-max", type=int, default=720, help="longer side of the streamed video")
    p.add_argument("--bitrate", type=int, default=1_000_000,
                   help="target bitrate of every encoder, bits/s (default: aiortc's H.264 default, inside VP8's range)")
    p.add_argument("--quality-frames", type=int, default=60,
                   help="frames of natural content per setup for its bitrate and PSNR (not timed)")
    p.add_argument("--json", type=Path, default=None, help="also write {\"live\": [rows]} to this file")


def rtp_codec(name: str) -> RTCRtpCodecParameters:
    return RTCRtpCodecParameters(mimeType=f"video/{name.upper()}", clockRate=90000, payloadType=96)


def pyav_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded webcam frame -> RGB, as the pipeline does it today."""
    return frame.to_ndarray(format="rgb24")


@dataclass
class Setup:
    """One way to send the output: the webcam's decoder and the output's encoder (one negotiation picks the codec
    both ways), and how the engine's face becomes the frame handed to the encoder."""
    name: str
    codec: str  # "vp8" / "h264"
    make_decoder: Callable[[], Decoder]
    make_encoder: Callable[[], Encoder]
    stream_max: int | None  # None: the full pasted-back size, as rgb24 (today)
    rgb: Callable[[av.VideoFrame], np.ndarray] = pyav_rgb  # webcam frame -> RGB
    fused: bool = False  # paste-back straight into the streamed frame (replaces paste + convert)
    reference: bool = False


def x264(preset: str, params: str = "") -> Callable[[], Encoder]:
    def make() -> Encoder:
        e = encode.FastH264Encoder()
        e.preset, e.params = preset, params
        return e
    return make


def setups(stream_max: int) -> list[Setup]:
    """The reference; aiortc's own encoders at the streamed size; the x264 presets; the tuned set-ups."""
    tuned_h264 = f"h264 x264 {encode.H264_PRESET} {encode.H264_PARAMS} (tuned)"
    return [
        Setup("vp8 aiortc, full size, rgb24 (today)", "vp8", Vp8Decoder, Vp8Encoder, None, reference=True),
        Setup("vp8 aiortc", "vp8", Vp8Decoder, Vp8Encoder, stream_max),
        Setup(f"vp8 cpu-used {encode.VP8_CPU_USED}, no denoiser (tuned), paste into stream", "vp8",
              encode.FastVp8Decoder, encode.TunedVp8Encoder, stream_max, encode.to_rgb, fused=True),
        Setup("h264 aiortc (x264 medium)", "h264", H264Decoder, H264Encoder, stream_max),
        *[Setup(f"h264 x264 {p}", "h264", encode.FastH264Decoder, x264(p), stream_max)
          for p in ("ultrafast", "superfast", "veryfast")],
        Setup(tuned_h264, "h264", encode.FastH264Decoder, encode.FastH264Encoder, stream_max, encode.to_rgb),
        Setup(f"{tuned_h264}, paste into stream", "h264", encode.FastH264Decoder, encode.FastH264Encoder,
              stream_max, encode.to_rgb, fused=True),
    ]


class Sent:
    """One setup's outgoing stream: convert, encode (both timed), decode what was sent and score it (not timed)."""

    def __init__(self, setup: Setup, bitrate: int):
        self.setup = setup
        self.frames = encode.StreamFrames(setup.stream_max) if setup.stream_max else None
        self.encoder, self.viewer = setup.make_encoder(), setup.make_encoder()  # the viewer's: its own encoder
        self.encoder.target_bitrate = self.viewer.target_bitrate = bitrate
        self.codec = rtp_codec(setup.codec)
        self.decoder = get_decoder(self.codec)
        self.bytes, self.psnr, self.size = 0, [], (0, 0)
        self.pastes = Pastes()

    def fused(self, source, face: np.ndarray | torch.Tensor) -> av.VideoFrame:
        """Paste-back straight into the streamed frame, as the pipeline's Animator.video does it."""
        return self.pastes(source, face, self.setup.stream_max)

    def convert(self, image: np.ndarray | torch.Tensor) -> av.VideoFrame:
        if self.frames:
            return self.frames(image)
        host = image.cpu().numpy() if isinstance(image, torch.Tensor) else image
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(host), format="rgb24")  # as AnimatedTrack.recv does

    def view(self, frame: av.VideoFrame) -> None:
        """What one viewer of the session costs per frame: its track's copy of the frame, its own encoder."""
        copy = av.VideoFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name)
        copy.pts, copy.time_base = frame.pts, frame.time_base
        self.viewer.encode(copy)

    def check(self, frame: av.VideoFrame, payloads: list[bytes], timestamp: int, scored: bool) -> None:
        data = b"".join(depayload(self.codec, p) for p in payloads)
        self.bytes += len(data) if scored else 0
        self.size = (frame.width, frame.height)
        sent = frame.to_ndarray()[:frame.height] if frame.format.name == "yuv420p" else \
            cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_RGB2YUV_I420)[:frame.height]
        for out in self.decoder.decode(JitterFrame(data, timestamp)) if data else []:
            if scored:
                self.psnr.append(psnr(out.to_ndarray(format="yuv420p")[:out.height], sent))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-6))


def webcam(frames: list[np.ndarray], codec: str) -> list[tuple[bytes, int]]:
    """The clip as the browser would send it: aiortc's encoder for `codec` at its default bitrate, depayloaded."""
    enc, c, out = (Vp8Encoder() if codec == "vp8" else H264Encoder()), rtp_codec(codec), []
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = i * STEP, CLOCK
        payloads, ts = enc.encode(frame)
        out.append((b"".join(depayload(c, p) for p in payloads), ts))
    return out


def portrait(size: int):
    """The sample portrait upscaled to size², prepared as the app prepares an upload."""
    import skimage.data
    from stream.face import prepare_source
    return prepare_source(cv2.resize(skimage.data.astronaut(), (size, size), interpolation=cv2.INTER_CUBIC))


def measure(engine, size: int, clip: list[np.ndarray], frames: int, warmup: int, stream_max: int,
            bitrate: int, quality_frames: int = 60) -> list[dict]:
    """One portrait size: every stage per frame, for every setup; a row per setup."""
    from stream.face import LiveFaceDriver
    source, name = portrait(size), f"bench-{size}"
    engine.set_source(source.crop.image_256, name, ratios=[*source.eye, *source.lip])
    cuda = engine.device.type == "cuda"
    total = warmup + frames
    settle = min(encode.FRAME_RATE // 2, frames // 2)  # frames before the bitrate and PSNR count: rate control settles
    incoming = {c: webcam([clip[i % len(clip)] for i in range(total)], c) for c in encode.CODECS}
    sent = [Sent(s, bitrate) for s in setups(stream_max)]
    decoders = {k: k[1]() for k in dict.fromkeys((s.setup.codec, s.setup.make_decoder, s.setup.rgb) for s in sent)}
    driver, pastes = LiveFaceDriver(), Pastes()
    ms: dict[str, list[float]] = {}
    per: list[dict[str, list[float]]] = [{} for _ in sent]

    def timed(into: dict, stage: str, fn: Callable, *args):
        t = time.perf_counter()
        out = fn(*args)
        if cuda and isinstance(out, torch.Tensor):
            torch.cuda.synchronize(engine.device)
        if i >= warmup:
            into.setdefault(stage, []).append((time.perf_counter() - t) * 1000)
        return out

    def decode(key: tuple) -> np.ndarray:
        data, ts = incoming[key[0]][i]
        return key[2](decoders[key].decode(JitterFrame(data, ts))[-1])
    crop = None
    try:
        for i in range(total):
            rgb = {k: timed(ms, k, decode, k) for k in decoders}
            f = timed(ms, "face", driver.process, rgb[next(iter(decoders))], i / encode.FRAME_RATE)  # today's
            crop = f.crop.image_256 if f.crop is not None else crop
            if crop is None:
                raise RuntimeError("no face found in the webcam clip")
            face = timed(ms, "engine", lambda: engine.animate(crop[None], [name], as_tensor=cuda)[0])
            image = timed(ms, "paste", pastes, source, face)
            for s, stages in zip(sent, per):
                if s.setup.fused:
                    frame = timed(stages, "paste", s.fused, source, face)
                else:
                    frame = timed(stages, "convert", s.convert, image)
                frame.pts, frame.time_base = i * STEP, CLOCK
                payloads, ts = timed(stages, "encode", s.encoder.encode, frame)
                timed(stages, "viewer", s.view, frame)
                s.check(frame, payloads, ts, scored=i >= warmup + settle)
    finally:
        driver.close()
        engine.close(name)
    natural = quality(source, len(face), quality_frames, stream_max, bitrate)
    rows = []
    for s, stages, (kbps, db) in zip(sent, per, natural):
        if s.setup.fused:  # its paste stage made the frame: no conversion of its own
            stages["convert"] = [0.0] * frames
        series = {"decode": ms[(s.setup.codec, s.setup.make_decoder, s.setup.rgb)],
                  **{k: ms[k] for k in ("face", "engine", "paste")}, **stages}
        outside = np.sum([series[k] for k in OUTSIDE], axis=0)
        scored = frames - settle
        rows.append(dict(
            portrait=size, codec=s.setup.codec, setup=s.setup.name, reference=s.setup.reference,
            stream_size=list(s.size), stages={k: round(float(np.median(v)), 2) for k, v in series.items()},
            p95={k: round(float(np.percentile(v, 95)), 2) for k, v in series.items()},
            total_ms=round(float(np.median(outside)), 2),
            viewer_ms=round(float(np.median(series["viewer"])), 2),  # per viewer per frame: not in the total
            outside_engine_ms=round(float(np.median(outside + np.array(series["face"]))), 2),
            kbps=round(s.bytes * 8 * encode.FRAME_RATE / scored / 1000), psnr_y_db=round(float(np.mean(s.psnr)), 2),
            natural_kbps=kbps, natural_psnr_y_db=db))
    ref = next(r for r in rows if r["reference"])
    for r in rows:
        r["ratio"] = round(r["total_ms"] / ref["total_ms"], 3)
        for key in ("psnr_y_db", "natural_psnr_y_db"):  # against aiortc's VP8 at the same (streamed) size
            r[key.replace("_y_db", "_vs_aiortc_vp8_db")] = round(r[key] - next(
                q[key] for q in rows if q["setup"] == "vp8 aiortc"), 2)
    return rows


def quality(source, size: int, frames: int, stream_max: int, bitrate: int) -> list[tuple[int, float]]:
    """(kbps, luma PSNR) of every setup on natural content: the portrait's own face, nodding and swaying, pasted
    back as the live path does. Untrained (recipe) weights make a high-frequency pattern in the face, which no
    codec handles as it handles a face."""
    face = cv2.resize(source.crop.image, (size, size), interpolation=cv2.INTER_AREA)
    faces = []
    for i in range(frames):
        a = 2 * np.pi * i / encode.FRAME_RATE
        m = cv2.getRotationMatrix2D((size / 2, size / 2), 5 * np.sin(a), 1.0)
        m[:, 2] += size / 512 * np.array([6 * np.sin(a), 4 * np.sin(2 * a)])
        faces.append(cv2.warpAffine(face, m, (size, size), borderMode=cv2.BORDER_REPLICATE))
    paste, out = PasteBack(source.image, source.crop.m_c2o, size), []
    settle = min(encode.FRAME_RATE // 2, frames // 2)
    for setup in setups(stream_max):
        s = Sent(setup, bitrate)
        for i, f in enumerate(faces):
            frame = s.fused(source, f) if setup.fused else s.convert(paste(f))
            frame.pts, frame.time_base = i * STEP, CLOCK
            s.check(frame, *s.encoder.encode(frame), scored=i >= settle)
        out.append((round(s.bytes * 8 * encode.FRAME_RATE / (len(faces) - settle) / 1000),
                    round(float(np.mean(s.psnr)), 2)))
    return out


def markdown(rows: list[dict]) -> str:
    """ms per frame (median / p95) per stage, the total outside the engine and face tracking, its ratio to the
    reference, and the stream's bitrate and quality."""
    stages = ("decode", "face", "engine", "paste", "convert", "encode")
    out = ["| portrait | setup | streamed | " + " | ".join(f"{s} ms" for s in stages) +
           " | total ms (decode+paste+convert+encode) | × reference | + face ms | ms per viewer | "
           "kbps / Y-PSNR dB, natural face | "
           "dB vs aiortc VP8 | kbps / Y-PSNR dB, untrained face | dB vs aiortc VP8 |",
           "|" + "---|" * (len(stages) + 11)]
    for r in rows:
        cells = [f"{r['stages'][s]:.1f} / {r['p95'][s]:.1f}" for s in stages]
        out.append(f"| {r['portrait']}² | {r['setup']} | {r['stream_size'][0]}×{r['stream_size'][1]} | "
                   + " | ".join(cells) + f" | **{r['total_ms']:.1f}** | {r['ratio']:.2f} | "
                   f"{r['outside_engine_ms']:.1f} | {r['viewer_ms']:.1f} | {r['natural_kbps']} / {r['natural_psnr_y_db']:.2f} | "
                   f"{r['natural_psnr_vs_aiortc_vp8_db']:+.2f} | {r['kbps']} / {r['psnr_y_db']:.2f} | "
                   f"{r['psnr_vs_aiortc_vp8_db']:+.2f} |")
    return "\n".join(out) + "\n"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def run(args: argparse.Namespace) -> int:
    """Every portrait size, in one process on one engine; the table, then the JSON."""
    from model.engine import Engine, load_networks
    from stream.serve_bench import moving_face, publish

    weights = args.weights or os.environ.get("LP_WEIGHTS") or "recipe"
    engine = Engine(load_networks(weights, args.config, download=not args.no_download), device=args.device)
    clip = moving_face()
    engine.set_source(clip[0][:256, 192:448].copy(), "warm")  # the first call's one-off costs, outside the rows
    engine.animate(clip[0][None, :256, 192:448].copy(), ["warm"])
    engine.close("warm")
    rows = []
    for size in (int(s) for s in args.portraits.split(",")):
        rows += measure(engine, size, clip, args.frames, args.warmup, args.stream_max, args.bitrate,
                        args.quality_frames)
        log.info("%s", rows[-1])
    device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else f"cpu ({cpu_name()})"
    header = (f"device {device} · {os.cpu_count()} cores · config {args.config} · weights "
              f"{'recipe (untrained)' if weights == 'recipe' else 'official'} · {args.frames} frames per portrait "
              f"after {args.warmup} · target bitrate {args.bitrate // 1000} kbps · 1-min load average "
              f"{os.getloadavg()[0]:.1f}")
    publish(header, markdown(rows), {"live": rows}, args.json)
    return 0
