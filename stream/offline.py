"""Offline renders driven by motion rather than by a webcam-like stream (SPEC §4.4, §4.9, §5.4): a motion template
(`.pkl`), a driving image (one output image), and a source video (v2v: each source frame keeps its own head motion,
the driving motion is added to it, both smoothed). stream/render.py chooses between these and its own path (a
portrait driven by a video), by what the files are.

Every engine call runs on the engine's scheduler thread (`Scheduler.call`), a few frames at a time, so live
sessions on the same engine wait for at most one such call.
"""
from __future__ import annotations

import uuid
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import av
import cv2
import numpy as np
import PIL.Image
from tqdm import tqdm

from model import drive
from model.engine import Engine
from model.template import Template
from stream.face import (SOURCE, FaceTracker, LiveFaceDriver, LiveTracker, NoFaceError, SourceFace, crop_driving,
                         crop_matrix, crop_params, eye_ratio, lip_ratio, limit_size)
from stream.paste import PasteBack
from stream.pipeline import Settings
from stream.recorder import CODEC
from stream.scheduler import Scheduler

CHUNK = 4  # frames per engine call
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
Progress = Callable[[float, str], None]  # (fraction done, what) for the page


class InputError(ValueError):
    """A user's file that cannot be used; the message says why, in words meant for the user."""


def kind(path: str | Path) -> str:
    """'template', 'image' or 'video', by the file's first bytes (and a .pkl name)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise InputError(f"Cannot read {path.name!r}: {e.strerror or e}") from None
    if path.suffix.lower() == ".pkl" or head[:1] == b"\x80":  # pickle protocol >= 2
        return "template"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")) or \
            (head.startswith(b"RIFF") and head[8:12] == b"WEBP"):
        return "image"
    return "video"


class Bar:
    """A tqdm bar on the terminal that also reports to the page's `progress` callback."""

    def __init__(self, total: int | None, desc: str, progress: Progress | None):
        self.bar, self.total, self.desc, self.progress, self.done = \
            tqdm(total=total, unit="frame", desc=desc), total, desc, progress, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        if self.progress:
            self.progress(self.done / self.total if self.total else 0.0, f"{self.desc}: {self.done} frames")

    def close(self) -> None:
        self.bar.close()


class Writer:
    """H.264 (else MPEG-4) yuv420p MP4 at a constant frame rate; audio from another file, re-encoded to AAC and cut
    to the video's length, is added at the end."""

    def __init__(self, path: str | Path, fps: float | Fraction, audio_from: str | Path | None = None):
        self.path, self.fps, self.frames = Path(path), Fraction(fps).limit_denominator(1001), 0
        self.out = av.open(str(self.path), "w")
        self.video = self.out.add_stream(CODEC, rate=self.fps)
        self.video.pix_fmt, self.video.codec_context.time_base = "yuv420p", 1 / self.fps
        if CODEC == "libx264":
            self.video.options = {"crf": "18"}  # the official writer's quality
        self.audio_in = self.audio = None
        if audio_from is not None:
            self.audio_in = av.open(str(audio_from))
            if self.audio_in.streams.audio:
                a = self.audio_in.streams.audio[0]
                self.audio = self.out.add_stream("aac", rate=a.rate, layout=a.layout.name)
            else:
                self.audio_in.close()
                self.audio_in = None

    def write(self, rgb: np.ndarray) -> None:
        if not self.frames:
            self.video.width, self.video.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:self.video.height, :self.video.width]),
                                           format="rgb24")
        frame.pts, frame.time_base = self.frames, 1 / self.fps
        self.out.mux(self.video.encode(frame))
        self.frames += 1

    def close(self) -> bool:
        """Flush, add the audio; True if there was some."""
        try:
            if self.frames:
                self.out.mux(self.video.encode(None))
            if self.audio is not None and self.frames:
                end, samples = self.frames / self.fps, 0
                for frame in self.audio_in.decode(audio=0):
                    if frame.time is not None and frame.time >= end:
                        break
                    frame.pts, frame.time_base = samples, Fraction(1, frame.sample_rate)
                    samples += frame.samples
                    self.out.mux(self.audio.encode(frame))
                self.out.mux(self.audio.encode(None))
            return self.audio is not None
        finally:
            self.out.close()
            if self.audio_in is not None:
                self.audio_in.close()

    def abort(self) -> None:
        """Close and delete: never leave a half-written file behind."""
        for c in (self.out, self.audio_in):
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
        self.path.unlink(missing_ok=True)


def write_video(frames: Iterable[np.ndarray], output: str | Path, fps: float | Fraction, total: int,
                progress: Progress | None, audio_from: str | Path | None = None) -> bool:
    """Write rendered RGB frames to an MP4 (`Writer`) with a "render" progress bar; True if it has audio. Any
    error, in the frames' making too, deletes the half-written file."""
    writer, bar = Writer(output, fps, audio_from), Bar(total, "render", progress)
    try:
        for frame in frames:
            writer.write(frame)
            bar.update()
        return writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def video_frames(path: str | Path, max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """RGB frames of a video file; InputError for an unreadable one or one longer than `max_seconds`."""
    name = Path(path).name
    try:
        c = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise InputError(f"Cannot read the video {name!r}: {e}") from None
    with c:
        if not c.streams.video:
            raise InputError(f"{name!r} has no video stream.")
        v = c.streams.video[0]
        fps = float(v.average_rate or v.guessed_rate or 25)
        too_long = InputError(f"{name!r} is longer than {max_seconds:g} s, the limit of this server."
                              if max_seconds is not None else "")
        if max_seconds is not None and (c.duration or 0) / av.time_base > max_seconds:
            raise too_long
        n = 0
        try:
            for frame in c.decode(v):
                if max_seconds is not None and n >= max_seconds * fps:
                    raise too_long
                n += 1
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as e:
            raise InputError(f"The video {name!r} could not be decoded: {e}") from None
        if not n:
            raise InputError(f"{name!r} contains no decodable video frames.")


def video_info(path: str | Path) -> tuple[Fraction, int | None]:
    """(frame rate, frame count if the header says) of a video."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise InputError(f"{Path(path).name!r} has no video stream.")
            v = c.streams.video[0]
            return Fraction(v.average_rate or v.guessed_rate or 25), v.frames or None
    except (av.FFmpegError, OSError) as e:
        raise InputError(f"Cannot read the video {Path(path).name!r}: {e}") from None


class Session:
    """One engine session for an offline render, driven by motion: the portrait set, the controls applied. Every
    engine call goes through the scheduler thread."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings, self.name = engine, settings, f"offline-{uuid.uuid4().hex[:12]}"
        self.scheduler = Scheduler.of(engine)

    def call(self, fn):
        return self.scheduler.call(fn)

    def set_source(self, crop_256: np.ndarray, eye: np.ndarray, lip: np.ndarray) -> None:
        def setup():
            self.engine.set_source(crop_256, self.name, ratios=[*eye, *lip])
            self.engine.set_controls(self.name, **self.settings.engine_controls(1.0))
        self.call(setup)

    def motion(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """M's motion of crops, CHUNK at a time."""
        parts = [self.call(lambda c=crops[i:i + CHUNK]: self.engine.extract_motion(c))
                 for i in range(0, len(crops), CHUNK)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        self.call(lambda: self.engine.close(self.name))


def _slice(motion: dict, i: int, j: int) -> dict:
    return {k: v[i:j] for k, v in motion.items()}


def driving_image_motion(session: Session, rgb: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """A driving image's motion (batch 1) and its eye/lip ratios: the face cropped as a driving frame."""
    tracker = FaceTracker()
    try:
        lmk = tracker.landmarks(np.ascontiguousarray(rgb))
    finally:
        tracker.close()
    if lmk is None:
        raise NoFaceError("No face found in the driving image. Please use a photo with one clearly visible face.")
    return session.motion(crop_driving(rgb, lmk).image_256[None]), eye_ratio(lmk), lip_ratio(lmk)


def driving_video_motion(session: Session, path: str | Path, max_seconds: float | None, limit: int | None,
                         progress: Progress | None) -> Template:
    """A driving video's motion, frame by frame, cropped as the live path crops (smoothed box); frames before the
    first face take its motion, frames without a face the last one's."""
    fps, total = video_info(path)
    driver, crops, ratios = LiveFaceDriver(), [], []
    bar = Bar(min(total or limit or 0, limit or total or 0) or None, "driving motion", progress)
    try:
        for i, rgb in enumerate(video_frames(path, max_seconds)):
            if limit is not None and i >= limit:
                break
            f = driver.process(rgb, i / float(fps))
            if f.crop is not None:
                crops.append(f.crop.image_256)
                ratios.append(np.concatenate([f.eye, f.lip]))
            else:
                crops.append(crops[-1] if crops else None)
                ratios.append(ratios[-1] if ratios else None)
            bar.update()
    finally:
        driver.close()
        bar.close()
    first = next((i for i, c in enumerate(crops) if c is not None), None)
    if first is None:
        raise NoFaceError(f"No face found in the driving video {Path(path).name!r}.")
    crops[:first], ratios[:first] = [crops[first]] * first, [ratios[first]] * first
    r = np.stack(ratios)
    return Template.from_motion(session.motion(np.stack(crops)), fps, r[:, :2], r[:, 2:])


def render_template(engine: Engine, source: SourceFace, template: Template, output: str | Path,
                    settings: Settings, max_seconds: float | None = None, progress: Progress | None = None) -> dict:
    """A portrait driven by a motion template: relative to the template's first frame, every control applied."""
    if max_seconds is not None and len(template) / template.fps > max_seconds:
        raise InputError(f"The motion template lasts {len(template) / template.fps:.1f} s, longer than "
                         f"{max_seconds:g} s, the limit of this server.")
    session = Session(engine, settings)

    def frames() -> Iterator[np.ndarray]:
        paste = None
        for i in range(0, len(template), CHUNK):
            j = min(i + CHUNK, len(template))
            faces = session.call(lambda: engine.animate_motion(template.kp_info(slice(i, j)), [session.name] * (j - i)))
            for face in faces:
                if settings.paste and paste is None:  # the face's size: 512, or less with a smaller config
                    paste = PasteBack(source.image, source.crop.m_c2o, len(face))
                yield paste(face) if paste else face
    try:
        session.set_source(source.crop.image_256, source.eye, source.lip)
        session.call(lambda: engine.set_reference_motion(template.kp_info(0), session.name))
        audio = write_video(frames(), output, template.fps, len(template), progress)
    finally:
        session.close()
    return dict(frames=len(template), fps=template.fps, audio=audio, output=str(output))


def render_image(engine: Engine, source: SourceFace, driving: np.ndarray, output: str | Path,
                 settings: Settings) -> dict:
    """A portrait given a driving image's expression (official single-image formula: against `lip_array`; the pose
    stays the portrait's). One image out."""
    session = Session(engine, settings)
    try:
        motion, _, _ = driving_image_motion(session, driving)
        session.set_source(source.crop.image_256, source.eye, source.lip)
        session.call(lambda: engine.set_reference_motion(drive.image_reference(motion, settings.region),
                                                                  session.name))
        face = session.call(lambda: engine.animate_motion(motion, [session.name]))[0]
    finally:
        session.close()
    image = PasteBack(source.image, source.crop.m_c2o, len(face))(face) if settings.paste else face
    PIL.Image.fromarray(image).save(output)
    return dict(frames=1, fps=None, audio=False, output=str(output), size=list(image.shape[1::-1]))


def render_source_video(engine: Engine, source: str | Path, driving: str | Path, output: str | Path,
                        settings: Settings, max_seconds: float | None = None, progress: Progress | None = None,
                        eye_retargeting: bool = False, save_template: str | Path | None = None) -> dict:
    """Video-to-video: every frame of the source video animated by the driving video, image or template (official
    v2v, relative mode): the source's own head motion is kept. Output: the shorter of the two, at the source's
    frame rate, with the driving video's audio (else the source's)."""
    from model.template import TemplateError, load as load_template
    fps, _ = video_info(source)
    driving_kind = kind(driving)
    session = Session(engine, settings)
    try:
        # pass 1: each source frame's crop (tracked face, its own rotated box) and motion
        tracker, m_o2c, ratios, crops = LiveTracker(), [], [], []
        bar = Bar(None, "source motion", progress)
        try:
            lmk = None
            for i, rgb in enumerate(video_frames(source, max_seconds)):
                image = limit_size(rgb)
                lmk = tracker.landmarks(image)
                if lmk is None:
                    if not m_o2c:
                        raise NoFaceError(f"No face found in the first frame of the source video "
                                          f"{Path(source).name!r}.")
                    m_o2c.append(m_o2c[-1])  # a frame without a face: the last box, the last ratios
                    ratios.append(ratios[-1])
                else:
                    m_o2c.append(crop_matrix(crop_params(lmk, SOURCE["scale"], SOURCE["vx"], SOURCE["vy"]), 512,
                                             SOURCE["rotate"]))
                    ratios.append(np.concatenate([eye_ratio(lmk), lip_ratio(lmk)]))
                crops.append(_crop_256(image, m_o2c[-1]))
                bar.update()
        finally:
            tracker.close()
            bar.close()
        src = Template.from_motion(session.motion(np.stack(crops)), fps)
        del crops
        ratios = np.stack(ratios)
        # the driving motion
        image = False
        if driving_kind == "template":
            try:
                drv = load_template(driving)
            except TemplateError as e:
                raise InputError(str(e)) from None
            image = len(drv) == 1
        elif driving_kind == "image":
            from stream.render import read_image
            motion, eye, lip = driving_image_motion(session, read_image(driving))
            drv, image = Template.from_motion(motion, fps, eye[None], lip[None]), True
        else:
            drv = driving_video_motion(session, driving, max_seconds, len(src), progress)
        if save_template is not None and not image:
            from model.template import save
            save(drv, save_template)
        n = len(src) if image else min(len(src), len(drv))
        arrays = lambda t, k: {key: getattr(t, key)[:k] for key in ("R", "exp", "kp", "scale", "t")}
        x_d = drive.source_video_keypoints(arrays(src, n), arrays(drv, 1 if image else n), settings.region, image)
        target = drive.source_eye_target(ratios[:, :2]) if eye_retargeting else None

        def frames() -> Iterator[np.ndarray]:  # pass 2: each source frame animated and pasted back into itself
            for i, rgb in enumerate(video_frames(source)):
                if i >= n:
                    break
                frame = limit_size(rgb)
                session.set_source(_crop_256(frame, m_o2c[i]), ratios[i, :2], ratios[i, 2:])
                after = None if target is None else session.call(
                    lambda: engine.eye_delta([*ratios[i, :2], target], session.name))
                face = session.call(lambda: engine.animate_keypoints(x_d[i:i + 1], session.name, after))[0]
                yield PasteBack(frame, np.linalg.inv(m_o2c[i]), len(face))(face) if settings.paste else face
        audio = write_video(frames(), output, fps, n, progress, driving if driving_kind == "video" else source)
    finally:
        session.close()
    return dict(frames=n, fps=float(fps), audio=audio, output=str(output))


def _crop_256(image: np.ndarray, m_o2c: np.ndarray) -> np.ndarray:
    """The source crop (512, rotated box) at the network's 256, as the official source path makes it."""
    crop = cv2.warpAffine(image, m_o2c[:2], (512, 512), flags=cv2.INTER_LINEAR)
    return cv2.resize(crop, (256, 256), interpolation=SOURCE["interp_256"])
