"""Render a portrait (or a source video) driven by a video file, an image or a motion template.

    python launch.py render --source portrait.jpg --driving clip.mp4 -o out.mp4 --save-template clip.pkl
    python launch.py render --source portrait.jpg --driving clip.pkl -o out.mp4     # a motion template
    python launch.py render --source portrait.jpg --driving face.jpg -o out.png     # one image
    python launch.py render --source talk.mp4 --driving clip.mp4 -o out.mp4       # video-to-video (stream/offline.py)
    python launch.py render ... --region lips --smile 0.8 --gaze-x -10   # animation region, editing sliders

A driving video with a portrait: every driving frame goes through the same per-frame path as the live view (face
crop with smoothing, engine, paste-back), so a file render previews exactly what the webcam would do. Audio is
re-encoded to AAC.
"""
from __future__ import annotations

import argparse
import io
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import PIL.Image
import PIL.ImageOps

from model.editing import REGIONS, SLIDERS, Edits
from model.engine import Engine, load_networks
from model.template import MotionLog, TemplateError
from model.template import load as load_template
from model.template import save as save_template_file
from stream import offline
from stream.face import NoFaceError, SourceFace, prepare_source
from stream.offline import IMAGE_SUFFIXES, Bar, InputError, Progress
from stream.pipeline import Animator, Settings
from stream.recorder import CODEC

MAX_BYTES = 20 * 1024 * 1024
MAX_SIDE = 8000
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")  # PNG JPEG WebP GIF BMP TIFF


def read_image(file: str | Path | bytes) -> np.ndarray:
    """Decode a portrait (a path, or the file's bytes) to RGB uint8 (EXIF orientation applied), refusing files over
    20 MB or 8000 px before decoding them, and non-images or damaged images with a clear message."""
    size = len(file) if isinstance(file, bytes) else Path(file).stat().st_size
    if size > MAX_BYTES:
        raise InputError(f"The file is {size / 2**20:.0f} MB; portraits are limited to {MAX_BYTES // 2**20} MB.")
    try:
        with PIL.Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as im:
            w, h = im.size  # read from the header: nothing decoded yet
            if max(w, h) > MAX_SIDE:
                raise InputError(f"The image is {w}×{h} pixels; portraits are limited to {MAX_SIDE} pixels a side.")
            return np.asarray(PIL.ImageOps.exif_transpose(im).convert("RGB"))
    except InputError:
        raise
    except PIL.Image.DecompressionBombError:
        raise InputError(f"The image is too large to decode safely (limit {MAX_SIDE} pixels a side).") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        head = file[:8] if isinstance(file, bytes) else Path(file).read_bytes()[:8]
        if isinstance(e, PIL.UnidentifiedImageError) and not head.startswith(IMAGE_MAGIC):
            raise InputError("The file is not an image. Please upload a PNG, JPEG or WebP photo.") from None
        raise InputError(f"The image file is corrupt or truncated and cannot be decoded ({e}).") from None


def render(engine: Engine, source: SourceFace | str | Path, driving: str | Path, output: str | Path,
           settings: Settings | None = None, max_seconds: float | None = None,
           save_template: str | Path | None = None, progress: Progress | None = None,
           source_eye_retargeting: bool = False) -> dict:
    """Animate `source` (a prepared portrait, or the path of a source video) with `driving` (a video, an image or a
    motion template) into `output`: an MP4, or one image for a portrait driven by an image. `save_template` writes
    the driving motion as a template (a driving video). Returns frames, fps, whether audio was written and the
    output path. Raises InputError for an unusable file or one longer than `max_seconds`, NoFaceError when a face
    is missing."""
    settings = settings or Settings()
    if not isinstance(source, SourceFace):
        return offline.render_source_video(engine, source, driving, output, settings, max_seconds, progress,
                                           source_eye_retargeting, save_template)
    driving_kind = offline.kind(driving)
    if driving_kind == "template":
        try:
            template = load_template(driving)
        except TemplateError as e:
            raise InputError(str(e)) from None
        return offline.render_template(engine, source, template, output, settings, max_seconds, progress)
    if driving_kind == "image":
        return offline.render_image(engine, source, read_image(driving), output, settings)
    return _render_video(engine, source, driving, output, settings, max_seconds, save_template, progress)


def _render_video(engine: Engine, source: SourceFace, driving: str | Path, output: str | Path, settings: Settings,
                  max_seconds: float | None, save_template: str | Path | None, progress: Progress | None) -> dict:
    """A portrait driven by every frame of a video, through the live path (H.264 + AAC MP4), with its audio."""
    try:
        src = av.open(str(driving))
    except (av.FFmpegError, OSError) as e:
        raise InputError(f"Cannot read the driving video {Path(driving).name!r}: {e}") from None
    animator = Animator(engine, source, settings)
    animator.keep_motion = save_template is not None
    motion = MotionLog()
    try:
        with src, av.open(str(output), "w") as dst:
            if not src.streams.video:
                raise InputError(f"{Path(driving).name!r} has no video stream.")
            vin = src.streams.video[0]
            ain = src.streams.audio[0] if src.streams.audio else None
            fps = vin.average_rate or vin.guessed_rate or Fraction(25)
            too_long = InputError(f"{Path(driving).name!r} is longer than {max_seconds:g} s, the limit of this "
                                  "server.") if max_seconds is not None else None
            if too_long and (src.duration or 0) / av.time_base > max_seconds:
                raise too_long
            vout = dst.add_stream(CODEC, rate=fps)
            vout.pix_fmt, vout.codec_context.time_base = "yuv420p", 1 / fps
            if CODEC == "libx264":
                vout.options = {"crf": "18"}  # the official writer's quality, as the other renders (offline.py)
            aout = dst.add_stream("aac", rate=ain.rate, layout=ain.layout.name) if ain else None
            frames, pts, audio = 0, -1, []  # audio waits for the first video frame: its size opens the output
            bar = Bar(vin.frames or None, "render", progress)
            try:
                for packet in src.demux(*[s for s in (vin, ain) if s]):
                    for frame in packet.decode():
                        if packet.stream is ain:
                            audio.append(frame)
                        else:
                            if too_long and frames >= max_seconds * fps:
                                raise too_long
                            out = animator(frame.to_ndarray(format="rgb24"), frame.time)
                            if animator.last_motion is not None:
                                motion.append(animator.last_motion)
                            if not frames:
                                vout.width, vout.height = out.shape[1], out.shape[0]
                            video = av.VideoFrame.from_ndarray(np.ascontiguousarray(out), format="rgb24")
                            # the input's timing, on the constant frame grid: the audio stays in sync
                            pts = max(pts + 1, round((frame.time if frame.time is not None else 0) * fps))
                            video.pts, video.time_base = pts, 1 / fps
                            dst.mux(vout.encode(video))
                            frames += 1
                            bar.update()
                        if frames:
                            for a in audio:
                                dst.mux(aout.encode(a))
                            audio.clear()
            finally:
                bar.close()
            if not frames:
                raise InputError(f"{Path(driving).name!r} contains no decodable video frames.")
            dst.mux(vout.encode(None))
            if aout:
                dst.mux(aout.encode(None))
    except (InputError, av.FFmpegError) as e:
        Path(output).unlink(missing_ok=True)  # never leave a half-written file behind
        if isinstance(e, InputError):
            raise
        raise InputError(f"The driving video {Path(driving).name!r} could not be decoded: {e}") from None
    finally:
        animator.close()
    if save_template is not None:
        if not len(motion):
            raise InputError(f"No face was found in {Path(driving).name!r}: there is no motion to save.")
        save_template_file(motion.template(float(fps)), save_template)
    return dict(frames=frames, fps=float(fps), audio=aout is not None, output=str(output))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True,
                   help="portrait image (PNG/JPEG/WebP), or a source video: each of its frames is animated, its own "
                        "head motion kept")
    p.add_argument("--driving", required=True,
                   help="driving video (its frame rate and audio are kept), driving image (its expression: one "
                        "output image), or motion template (.pkl, the official format)")
    p.add_argument("-o", "--output", required=True, help="output MP4 (an image file for a driving image)")
    p.add_argument("--save-template", metavar="PKL",
                   help="also write the driving video's motion as a motion template (.pkl, the official format)")
    p.add_argument("--source-eye-retargeting", action="store_true",
                   help="source video: keep the eyes as open as in its first frame (official "
                        "flag_source_video_eye_retargeting)")
    g = p.add_argument_group("animation region and editing (the official app's sliders, applied to every frame)")
    g.add_argument("--region", choices=REGIONS, default="all", help="what the driving video animates (default: all)")
    for name, (lo, hi, default, _, label) in SLIDERS.items():
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_in_range(lo, hi), default=default,
                       metavar="X", help=f"{label}: {lo:g} .. {hi:g} (default {default:g})")


def _in_range(lo: float, hi: float):
    def parse(text: str) -> float:
        value = float(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value:g} is outside {lo:g} .. {hi:g}")
        return value
    return parse


def run(args: argparse.Namespace) -> int:
    """CLI: load the engine, render, print where the file went; bad inputs print a message and return 1."""
    try:
        source_video = offline.kind(args.source) == "video"
        driving_kind = offline.kind(args.driving)
        if driving_kind == "image" and not source_video and Path(args.output).suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"A driving image gives one image: name the output {Path(args.output).stem}.png "
                             "(or .jpg).")
        if args.save_template and driving_kind != "video":
            raise InputError("--save-template saves a driving video's motion; the driving input is not a video.")
        if args.source_eye_retargeting and not source_video:
            raise InputError("--source-eye-retargeting applies to a source video; the source is an image.")
        if source_video:
            try:
                offline.video_info(args.source)
            except InputError:
                raise InputError(f"The source {Path(args.source).name!r} is not an image (PNG, JPEG, WebP) and not a "
                                 "readable video either.") from None
        source = args.source if source_video else prepare_source(read_image(args.source))
    except (InputError, NoFaceError, OSError) as e:
        print(f"error: {e}" if isinstance(e, InputError) else f"error: source {args.source}: {e}", file=sys.stderr)
        return 1
    engine = Engine(load_networks(args.weights, args.config, download=not args.no_download), device=args.device)
    try:
        settings = Settings(region=args.region, edits=Edits(**{k: getattr(args, k) for k in SLIDERS}))
        info = render(engine, source, args.driving, args.output, settings, save_template=args.save_template,
                      source_eye_retargeting=args.source_eye_retargeting)
    except (InputError, NoFaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if info["fps"] is None:
        print(f"wrote {args.output}: one image, {info['size'][0]}x{info['size'][1]}")
    else:
        print(f"wrote {args.output}: {info['frames']} frames at {info['fps']:g} fps"
              f"{', with audio' if info['audio'] else ', no audio'}")
    if args.save_template:
        print(f"wrote {args.save_template}: the driving motion as a motion template")
    return 0
