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


# ---- every source kind with every driving kind (stream/offline.py), on the tiny recipe networks ----

SOURCE_FRAMES = 9


@pytest.fixture(scope="module")
def kinds(inputs):
    """A source video (9 frames, with a tone), a driving image, and a template saved from the driving video."""
    driving_video(inputs / "source.mp4", frames=SOURCE_FRAMES)
    PIL.Image.fromarray(skimage.data.astronaut()[:, ::-1]).save(inputs / "face.jpg")
    assert run_render("--source", inputs / "portrait.png", "--driving", inputs / "driving.mp4", "-o",
                      inputs / "saved.mp4", "--save-template", inputs / "motion.pkl") == 0
    return inputs


def video_facts(path) -> dict:
    """Frame count, size, frame rate and audio seconds of an MP4."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        facts = dict(size=(v.width, v.height), fps=v.average_rate, audio=bool(c.streams.audio))
        facts["frames"] = sum(1 for _ in c.decode(video=0))
    if facts["audio"]:
        with av.open(str(path)) as c:
            facts["audio_s"] = sum(f.samples for f in c.decode(audio=0)) / c.streams.audio[0].rate
    return facts


def test_save_template_from_a_driving_video(kinds, capsys):
    from model.template import load
    t = load(kinds / "motion.pkl")
    assert len(t) == FRAMES and t.fps == FPS  # one motion per driving frame, the video's rate
    assert t.eyes.shape == (FRAMES, 2) and t.lip.shape == (FRAMES, 1)
    assert video_facts(kinds / "saved.mp4")["frames"] == FRAMES


def test_portrait_driven_by_a_template(kinds, capsys):
    out = kinds / "from_template.mp4"
    assert run_render("--source", kinds / "portrait.png", "--driving", kinds / "motion.pkl", "-o", out) == 0
    assert "12 frames at 15 fps, no audio" in capsys.readouterr().out
    f = video_facts(out)
    assert (f["frames"], f["size"], f["fps"], f["audio"]) == (FRAMES, (512, 512), FPS, False)
    # the same motion as the driving video's render: the same frames, up to the re-encoding
    with av.open(str(out)) as a, av.open(str(kinds / "saved.mp4")) as b:
        for fa, fb in zip(a.decode(video=0), b.decode(video=0)):
            assert np.abs(fa.to_ndarray(format="rgb24").astype(int) - fb.to_ndarray(format="rgb24")).mean() < 1.0


def test_portrait_driven_by_an_image(kinds, capsys):
    out = kinds / "from_image.png"
    assert run_render("--source", kinds / "portrait.png", "--driving", kinds / "face.jpg", "-o", out) == 0
    assert "one image, 512x512" in capsys.readouterr().out
    image = np.asarray(PIL.Image.open(out))
    assert image.shape == (512, 512, 3)
    assert np.abs(image.astype(int) - skimage.data.astronaut()).mean() > 0.5  # animated, not the portrait as is
    assert run_render("--source", kinds / "portrait.png", "--driving", kinds / "face.jpg", "-o", kinds / "x.mp4") == 1
    assert "A driving image gives one image: name the output x.png" in capsys.readouterr().err


@pytest.mark.parametrize("source, driving", [("source.mp4", "driving.mp4"), ("source.mp4", "face.jpg"),
                                             ("source.mp4", "motion.pkl"), ("driving.mp4", "source.mp4")])
def test_source_video(kinds, source, driving, capsys):
    """Source video: the shorter of the two (9 frames, whichever is shorter), at the source's rate and size, the
    driving video's audio (else the source's), as long as the video."""
    out = kinds / f"v2v_{source}_{driving}.mp4"
    assert run_render("--source", kinds / source, "--driving", kinds / driving, "-o", out) == 0
    assert f"{SOURCE_FRAMES} frames at 15 fps, with audio" in capsys.readouterr().out
    f = video_facts(out)
    assert (f["frames"], f["size"], f["fps"], f["audio"]) == (SOURCE_FRAMES, (320, 320), FPS, True)
    assert abs(f["audio_s"] - SOURCE_FRAMES / FPS) < 0.1


def test_source_video_eye_retargeting_and_limits(kinds, tmp_path, capsys):
    from model.engine import Engine, load_networks
    from stream.render import InputError, render
    engine = Engine(load_networks("recipe", "tiny"), device="cpu")
    plain, eyes = tmp_path / "plain.mp4", tmp_path / "eyes.mp4"
    render(engine, kinds / "source.mp4", kinds / "driving.mp4", plain)
    info = render(engine, kinds / "source.mp4", kinds / "driving.mp4", eyes, source_eye_retargeting=True)
    assert info["frames"] == SOURCE_FRAMES
    with av.open(str(plain)) as a, av.open(str(eyes)) as b:
        diff = [np.abs(fa.to_ndarray(format="rgb24").astype(int) - fb.to_ndarray(format="rgb24")).max()
                for fa, fb in zip(a.decode(video=0), b.decode(video=0))]
    assert max(diff) > 10  # the eye delta moved the face
    seen = []
    with pytest.raises(InputError, match="longer than 0.3 s"):
        render(engine, kinds / "source.mp4", kinds / "driving.mp4", tmp_path / "long.mp4", max_seconds=0.3,
               progress=lambda done, what: seen.append(what))
    assert not (tmp_path / "long.mp4").exists()
    render(engine, kinds / "source.mp4", kinds / "motion.pkl", tmp_path / "p.mp4",
           progress=lambda done, what: seen.append((round(done, 2), what)))
    assert seen[-1] == (1.0, f"render: {SOURCE_FRAMES} frames")  # the page's progress reaches the end


def test_a_render_failing_midway_leaves_no_file(tmp_path):
    """Both offline video renders write through `write_video`: an error while the frames are made, after some
    were written, deletes the half-written file and reaches the caller; a render that ends keeps every frame."""
    from stream.offline import write_video

    def frames(fail: bool):
        for i in range(3):
            yield np.full((64, 64, 3), 40 * i, np.uint8)
        if fail:
            raise RuntimeError("the engine failed on purpose")
    out, seen = tmp_path / "out.mp4", []
    with pytest.raises(RuntimeError, match="on purpose"):
        write_video(frames(True), out, 25, 3, None)
    assert not out.exists()
    assert write_video(frames(False), out, 25, 3, lambda done, what: seen.append((done, what))) is False
    assert video_facts(out)["frames"] == 3 and seen[-1] == (1.0, "render: 3 frames")
