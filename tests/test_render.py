"""`launch.py render`: frame count, the driving video's frame rate, its audio, and clear errors for bad inputs."""
from fractions import Fraction

import av
import cv2
import numpy as np
import PIL.Image
import pytest
import skimage.data

import launch

FPS, FRAMES, RATE = Fraction(15), 12, 44100


def driving_video(path, frames=FRAMES, fps=FPS):
    """The astronaut slightly shifted and rotated per frame, plus a 440 Hz tone for the whole clip."""
    img = skimage.data.astronaut()
    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=RATE, layout="mono")
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = 320, 320, "yuv420p"
        for i in range(frames):
            m = cv2.getRotationMatrix2D((256, 256), 3 * np.sin(i / 2), 1.0)
            m[0, 2] += 5 * np.sin(i / 3)
            frame = cv2.resize(cv2.warpAffine(img, m, (512, 512), borderMode=cv2.BORDER_REFLECT), (320, 320))
            frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            frame.pts = i + 3  # the video starts 0.2 s in, so the file opens with audio packets
            c.mux(v.encode(frame))
        c.mux(v.encode(None))
        samples = int(RATE * frames / fps)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / RATE)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = RATE, start
            c.mux(a.encode(chunk))
        c.mux(a.encode(None))


def run_render(*argv) -> int:
    """`python launch.py render ...` in-process, on the tiny untrained networks."""
    return launch.main(["render", "--weights", "recipe", "--config", "tiny", *map(str, argv)])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("render")
    PIL.Image.fromarray(skimage.data.astronaut()).save(d / "portrait.png")
    driving_video(d / "driving.mp4")
    return d


def test_render_keeps_frames_fps_and_audio(inputs, capsys):
    out = inputs / "out.mp4"
    assert run_render("--source", inputs / "portrait.png", "--driving", inputs / "driving.mp4", "-o", out) == 0
    assert "12 frames at 15 fps, with audio" in capsys.readouterr().out
    with av.open(str(out)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        assert video.average_rate == FPS
        assert (video.width, video.height) == (512, 512)  # pasted back into the 512² portrait
        assert audio.codec_context.name == "aac" and audio.rate == RATE
        decoded = [f for f in c.decode(video)]
    assert len(decoded) == FRAMES
    assert abs(decoded[0].time - 0.2) < 0.01  # starts where the driving video starts: in sync with the audio
    with av.open(str(out)) as c:
        seconds = sum(f.samples for f in c.decode(audio=0)) / RATE
    assert abs(seconds - FRAMES / FPS) < 0.1


def test_render_bad_inputs(inputs, tmp_path, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    out = tmp_path / "out.mp4"
    assert run_render("--source", inputs / "portrait.png", "--driving", junk, "-o", out) == 1
    assert "Cannot read the driving video 'junk.mp4'" in capsys.readouterr().err
    assert not out.exists()

    PIL.Image.new("RGB", (320, 240), (90, 120, 200)).save(tmp_path / "wall.png")
    assert run_render("--source", tmp_path / "wall.png", "--driving", inputs / "driving.mp4", "-o", out) == 1
    assert "No face found in the portrait" in capsys.readouterr().err

    assert run_render("--source", junk, "--driving", inputs / "driving.mp4", "-o", out) == 1
    assert "not an image" in capsys.readouterr().err
    assert not out.exists()
