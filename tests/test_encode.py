"""The streamed video path (stream/encode.py): one resize + BT.601 conversion, paste-back into the streamed frame
(stream/paste.py), the tuned aiortc encoders and decoders as aiortc builds them, and the codec a real aiortc peer
pair negotiates."""
import asyncio
import re
from fractions import Fraction

import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import av
import cv2
import numpy as np
import pytest
import skimage.data
import torch
from aiortc import RTCPeerConnection, VideoStreamTrack
from aiortc.codecs import OpusDecoder, OpusEncoder, Vp8Encoder, depayload
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from stream import encode
from stream.encode import StreamFrames, stream_size, yuv420_device, yuv420_host
from stream.paste import PasteBack, StreamPaste

CLOCK = Fraction(1, 90000)


def astronaut(size: int) -> np.ndarray:
    return cv2.resize(skimage.data.astronaut(), (size, size), interpolation=cv2.INTER_CUBIC)


def bt601(rgb: np.ndarray) -> np.ndarray:
    """The reference: I420 planes by the BT.601 formula in float64, chroma of each 2x2 block's mean colour."""
    h, w = rgb.shape[:2]
    x = rgb.astype(np.float64)
    y = x @ encode.BT601[0, :3] + 16
    mean = x.reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))
    u, v = mean @ encode.BT601[1, :3] + 128, mean @ encode.BT601[2, :3] + 128
    return np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(h * 3 // 2, w)


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64))


@pytest.mark.parametrize("w, h, limit, expect", [
    (1280, 1280, 720, (720, 720)), (512, 512, 720, (512, 512)), (1280, 720, 720, (720, 404)),
    (720, 1280, 720, (404, 720)), (641, 481, 720, (640, 480)), (1000, 600, 720, (720, 432))])
def test_stream_size_fits_even_never_enlarged(w, h, limit, expect):
    assert stream_size(w, h, limit) == expect


def test_host_conversion_is_bt601_with_averaged_chroma():
    rgb = astronaut(512)
    d = diff(yuv420_host(rgb, (512, 512)), bt601(rgb))
    assert d[:512].max() <= 1  # luma: cv2's fixed-point BT.601
    assert d[512:].max() <= 2 and d[512:].mean() < 0.5  # chroma: each 2x2 block's average, not its corner


def test_host_conversion_resizes_once_to_the_stream_size():
    rgb = astronaut(1280)
    planes = yuv420_host(rgb, (720, 720))
    assert planes.shape == (1080, 720)
    small = cv2.resize(rgb, (720, 720), interpolation=cv2.INTER_LINEAR)
    assert diff(planes, bt601(small)).max() <= 2


@pytest.mark.parametrize("size, stream", [(512, (512, 512)), (1280, (720, 720)), (640, (640, 480))])
def test_torch_path_matches_the_host_path(size, stream):
    """The device path, run on CPU tensors: the same planes, up to the resize filter (antialiased on the
    device, bilinear on the host)."""
    rgb = astronaut(size)[: size * stream[1] // stream[0]]
    host, dev = yuv420_host(rgb, stream), yuv420_device(torch.from_numpy(rgb), stream).numpy()
    assert dev.shape == host.shape and dev.dtype == np.uint8
    d = diff(dev, host)
    if stream[0] == size:  # no resize: the same formula
        assert d.max() <= 2 and d.mean() < 0.3
    else:
        assert d.mean() < 1.0 and np.percentile(d, 99) <= 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the device path runs on the GPU")
def test_device_path_on_cuda_sends_only_the_planes():
    rgb = astronaut(1280)
    frame = StreamFrames(720)(torch.from_numpy(rgb).cuda())
    assert (frame.width, frame.height, frame.format.name) == (720, 720, "yuv420p")
    cpu = yuv420_device(torch.from_numpy(rgb), (720, 720)).numpy()
    assert diff(frame.to_ndarray(), cpu).max() <= 1


def test_stream_frames_leave_the_full_size_image_alone():
    rgb = astronaut(1280)
    before = rgb.copy()
    frame = StreamFrames(720)(rgb)
    assert (frame.width, frame.height, frame.format.name) == (720, 720, "yuv420p")
    assert np.array_equal(rgb, before)  # the recording's full-size image


@pytest.fixture(scope="module")
def sources():
    from stream.live_bench import portrait
    return {size: portrait(size) for size in (512, 1280)}


@pytest.mark.parametrize("size", [512, 1280])
def test_stream_paste_is_paste_back_then_conversion(sources, size):
    src = sources[size]
    face = np.ascontiguousarray(cv2.resize(src.crop.image, (256, 256))[::-1])  # not the portrait's own face
    direct = StreamPaste(src.image, src.crop.m_c2o, 256, 720)(face)
    two_steps = StreamFrames(720)(PasteBack(src.image, src.crop.m_c2o, 256)(face))
    assert (direct.width, direct.height) == (two_steps.width, two_steps.height) == stream_size(size, size, 720)
    d = diff(direct.to_ndarray(), two_steps.to_ndarray())
    if size == 512:  # no resize: the same pixels
        assert d.max() <= 1
    else:  # resampled once instead of twice
        assert d.mean() < 0.2 and np.percentile(d, 99.9) <= 8
    changed = diff(direct.to_ndarray(), StreamFrames(720)(src.image).to_ndarray())
    assert changed.max() > 50  # the face really is pasted in


def test_webcam_frames_to_rgb_match_pyav():
    from stream.serve_bench import moving_face
    rgb = moving_face(2)[0]
    frame = av.VideoFrame.from_ndarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
    d = diff(encode.to_rgb(frame), frame.to_ndarray(format="rgb24"))
    assert encode.to_rgb(frame).shape == (480, 640, 3) and d.mean() < 1.5 and d.max() <= 4
    assert np.array_equal(encode.to_rgb(av.VideoFrame.from_ndarray(rgb, format="rgb24")), rgb)


# ---- encoders and decoders, as aiortc's sender and receiver build them ----

def codec(name: str) -> RTCRtpCodecParameters:
    return RTCRtpCodecParameters(mimeType=f"video/{name}", clockRate=90000, payloadType=96)


def moving(n: int, size: int = 512) -> list[av.VideoFrame]:
    rgb, frames = astronaut(size), []
    for i in range(n):
        m = cv2.getRotationMatrix2D((size / 2, size / 2), 4 * np.sin(i / 3), 1.0)
        frames.append(StreamFrames(720)(cv2.warpAffine(rgb, m, (size, size), borderMode=cv2.BORDER_REPLICATE)))
    return frames


def send(encoder, frames: list[av.VideoFrame], name: str) -> list[bytes]:
    """Each frame encoded and depayloaded as a receiver would reassemble it."""
    out = []
    for i, f in enumerate(frames):
        f.pts, f.time_base = i * 3000, CLOCK
        payloads, _ = encoder.encode(f)
        out.append(b"".join(depayload(codec(name), p) for p in payloads))
    return out


def nal_units(stream: bytes) -> list[bytes]:
    return [n for n in re.split(b"\x00\x00\x00\x01|\x00\x00\x01", stream) if n]


def test_h264_is_constrained_baseline_without_b_frames_with_the_tuned_x264():
    enc = encode.make_encoder(codec("H264"))
    assert isinstance(enc, encode.FastH264Encoder)
    data = send(enc, moving(20), "H264")
    nals = [n for d in data for n in nal_units(d)]
    sps = next(n for n in nals if n[0] & 0x1F == 7)
    assert sps[1] == 66 and sps[2] & 0x40  # profile_idc baseline + constraint_set1: constrained baseline
    sei = b"".join(n for n in nals if n[0] & 0x1F == 6).decode("latin-1")
    assert "bframes=0" in sei and "subme=1" in sei and "deblock=1:0:0" in sei  # x264 writes its settings here
    assert "threads=1" in sei and "vbv_maxrate=1000" in sei
    dec = av.CodecContext.create("h264", "r")
    types = [av.video.frame.PictureType(f.pict_type).name for d in data for f in dec.decode(av.Packet(d))]
    assert len(types) == 20 and set(types) <= {"I", "P"}


def test_tuned_vp8_is_aiortcs_vp8_but_for_its_speed_and_denoiser():
    """libvpx at a fixed speed is deterministic: with aiortc's speed and denoiser the tuned encoder writes
    aiortc's bytes (so it builds the same codec otherwise), with its own it writes others, also after the
    bitrate moves (aiortc rebuilds the codec on a >10% change: ours must rebuild it)."""
    frames = moving(6)
    same = encode.TunedVp8Encoder()
    same.cpu_used, same.noise_sensitivity = -6, 4
    tuned = encode.make_encoder(codec("VP8"))
    assert isinstance(tuned, encode.TunedVp8Encoder)
    streams = [send(e, frames[:3], "VP8") for e in (Vp8Encoder(), same, tuned)]
    assert streams[1] == streams[0] and streams[2] != streams[0]
    after = []
    for e in (Vp8Encoder(), tuned):
        e.target_bitrate = 1_200_000
        after.append(send(e, frames[3:], "VP8"))
    assert tuned.codec.bit_rate == 1_200_000 and after[1] != after[0]
    dec = encode.make_decoder(codec("VP8"))
    assert dec.codec.name == "vp8"  # FFmpeg's decoder, not libvpx's
    assert sum(len(dec.decode(JitterFrame(d, 0))) for d in streams[2] + after[1]) == 6


def test_other_codecs_stay_aiortcs():
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    assert type(encode.make_encoder(opus)) is OpusEncoder and type(encode.make_decoder(opus)) is OpusDecoder


@pytest.fixture(scope="module")
def quality(sources):
    from stream.live_bench import quality, setups
    return dict(zip((s.name for s in setups(720)), quality(sources[512], 256, 60, 720, 1_000_000)))


def test_every_setup_sends_a_face_above_the_psnr_floor(quality):
    for name, (kbps, db) in quality.items():
        assert db > 38, name
        assert 300 < kbps < 1300, name  # about the equal target bitrate (1 Mbps)


def test_tuned_setups_are_within_1_db_of_aiortcs_vp8(quality):
    today = quality["vp8 aiortc"][1]
    tuned = [db for name, (_, db) in quality.items() if "tuned" in name]
    assert len(tuned) == 3 and min(tuned) > today - 1.0


def test_codec_preferences():
    h264 = encode.codec_preferences("h264")
    names = [c.mimeType.lower() for c in h264]
    assert names[0] == "video/h264" and h264[0].parameters["profile-level-id"] == "42e01f"
    assert names.index("video/vp8") > max(i for i, n in enumerate(names) if n == "video/h264")
    assert [c.mimeType.lower() for c in encode.codec_preferences("vp8")] == ["video/vp8", "video/rtx"]
    with pytest.raises(ValueError):
        encode.codec_preferences("av1")


# ---- a real aiortc peer pair over loopback ----

class Frames(VideoStreamTrack):
    """A track of ready frames (rgb24 or yuv420p), looped."""

    def __init__(self, frames: list[av.VideoFrame]):
        super().__init__()
        self.frames, self.i = frames, 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = self.frames[self.i % len(self.frames)]
        self.i += 1
        out = av.VideoFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name)
        out.pts, out.time_base = pts, time_base
        return out


async def call(codec_name: str) -> dict:
    """A browser stand-in (aiortc, default offer: VP8 then H.264) sends a 640x480 webcam; the server answers
    as the app will: a transceiver made first with prefer_codec, then the offer, then its 1280² output streamed
    at 720. Returns the negotiated codecs, the encoder the server's sender built and frames each side received."""
    from stream.serve_bench import moving_face
    webcam = [av.VideoFrame.from_ndarray(f, format="rgb24") for f in moving_face(6)]
    output = [StreamFrames(720)(astronaut(1280))]
    client, server = RTCPeerConnection(), RTCPeerConnection()
    got: dict[str, list] = {"client": [], "server": []}

    async def read(track, into):
        for _ in range(3):
            into.append(await track.recv())
    tasks = []
    client.on("track", lambda t: tasks.append(asyncio.ensure_future(read(t, got["client"]))))
    server.on("track", lambda t: tasks.append(asyncio.ensure_future(read(t, got["server"]))))
    try:
        client.addTransceiver(Frames(webcam), direction="sendrecv")
        await client.setLocalDescription(await client.createOffer())
        transceiver = server.addTransceiver("video", direction="sendrecv")
        encode.prefer_codec(transceiver, codec_name)
        await server.setRemoteDescription(client.localDescription)
        server.addTrack(Frames(output))
        await server.setLocalDescription(await server.createAnswer())
        await client.setRemoteDescription(server.localDescription)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return dict(answer=encode.negotiated_codec(server.localDescription.sdp),
                    offer=encode.negotiated_codec(client.localDescription.sdp),
                    encoder=type(transceiver.sender._RTCRtpSender__encoder), got=got,
                    transceivers=len(server.getTransceivers()))
    finally:
        await client.close()
        await server.close()


@pytest.fixture
def peers(loopback_only, monkeypatch):
    import aioice.ice
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    for module, name in ((aiortc.rtcrtpsender, "get_encoder"), (aiortc.rtcrtpreceiver, "get_decoder")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    encode.install()
    return lambda name: asyncio.run(call(name))


@pytest.mark.parametrize("name, negotiated, encoder", [("h264", "H264", encode.FastH264Encoder),
                                                       ("vp8", "VP8", encode.TunedVp8Encoder)])
def test_peer_pair_negotiates_the_preferred_codec_and_frames_arrive(peers, name, negotiated, encoder):
    r = peers(name)
    assert r["offer"] == "VP8"  # the browser stand-in lists VP8 first: the server's preference decides
    assert r["answer"] == negotiated and r["encoder"] is encoder and r["transceivers"] == 1
    assert [(f.width, f.height) for f in r["got"]["client"]] == [(720, 720)] * 3  # streamed at 720
    assert [(f.width, f.height) for f in r["got"]["server"]] == [(640, 480)] * 3  # the webcam, decoded


def test_the_colour_matrix_goes_to_a_device_once():
    rgb = torch.zeros((64, 96, 3), dtype=torch.uint8)
    yuv420_device(rgb, (48, 32))
    made = []

    class Factories(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.tensor, torch.as_tensor) and (kwargs or {}).get("device") is not None:
                made.append(func.__name__)
            return func(*args, **(kwargs or {}))
    with Factories():
        yuv420_device(rgb, (48, 32))
    assert made == []  # per frame, no host->device copy of the constants (on CUDA: a sync of the whole GPU)
