"""The outgoing video: one resize to the streamed size and one colour conversion, straight to the yuv420p frame
aiortc's encoder takes, and encoders tuned for live video inside aiortc; on the way in, the webcam's decoders and
the decoded frame's conversion to RGB.

aiortc hands an rgb24 frame to its encoder, which converts it again (VP8 with a new SwsContext per frame), and it
encodes at the portrait's full size with a general-purpose x264 ("medium") or libvpx setting. Here:

    frames = StreamFrames(stream_max)        # one per session; no per-frame converter set-up (cv2, in place)
    video_frame = frames(image)              # full-size RGB (ndarray on the host, or HxWx3 uint8 tensor on a
                                             # device) -> yuv420p av.VideoFrame, long side <= stream_max
    install()                                # once per process: aiortc builds the tuned encoders/decoders
    rgb = to_rgb(webcam_frame)               # a decoded webcam frame -> RGB for the face tracker
    prefer_codec(transceiver, codec)         # per peer, on a transceiver made before setRemoteDescription
    negotiated_codec(pc.localDescription.sdp)  # "H264" / "VP8": what the page's metrics line names

Paste-back straight into the streamed frame (no full-size image) is stream/paste.py's `StreamPaste`, which uses the
conversion here. The recording keeps the full-size image: only the encoder's copy is resized. preferCodec in
web/static/live.js is the browser half of the codec choice. The measurements behind the settings are in
docs/benchmarks.md ("The live path per stage").
"""
from __future__ import annotations

import fractions
import functools
from typing import Iterator

import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import av
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from aiortc import RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs import H264Decoder, H264Encoder, Vp8Decoder, Vp8Encoder, get_decoder, get_encoder
from aiortc.codecs.base import Decoder, Encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.sdp import SessionDescription

CODECS = ("h264", "vp8")
FRAME_RATE = 30  # aiortc's MAX_FRAME_RATE: the encoders' time base

# BT.601, limited range: what browsers assume for a VP8/H.264 stream that signals no colour space, and what
# swscale and cv2's I420 conversion use. Rows Y, U, V; the last column is the offset.
BT601 = np.array([[0.256788, 0.504129, 0.097906, 16.0],
                  [-0.148223, -0.290993, 0.439216, 128.0],
                  [0.439216, -0.367789, -0.071427, 128.0]])
_FULL_TO_LIMITED_CHROMA = np.round(128 + (np.arange(256) - 128) * 224 / 255).clip(0, 255).astype(np.uint8)


# ---- resize + colour conversion, once ----

def stream_size(width: int, height: int, stream_max: int) -> tuple[int, int]:
    """(w, h) that fits `stream_max` on the longer side, never enlarged, both even (yuv420p halves them)."""
    k = min(1.0, stream_max / max(width, height))
    return max(2, round(width * k / 2) * 2), max(2, round(height * k / 2) * 2)


def yuv420_host(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 RGB -> I420 planes (h*3/2, w) at `size` = (w, h): bilinear resize (cheaper than INTER_AREA at a
    non-integer ratio: docs/benchmarks.md), BT.601 limited range, chroma averaged over each 2x2 block (cv2's own
    I420 chroma takes the top-left pixel, which aliases colour edges, so only its luma is kept)."""
    w, h = size
    if rgb.shape[1::-1] != (w, h):
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    out = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    ycrcb = cv2.cvtColor(cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2YCrCb)
    chroma = cv2.LUT(ycrcb, _FULL_TO_LIMITED_CHROMA)  # JPEG's full-range chroma -> limited range
    u, v = chroma_planes(out, w, h)
    u[:], v[:] = chroma[..., 2], chroma[..., 1]  # U = Cb, V = Cr
    return out


def chroma_planes(planes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Views of the U and V planes, (h/2, w/2) each, in I420 planes (h*3/2, w): stored one after the other after Y
    (a plane's rows do not line up with the array's rows unless h is a multiple of 4)."""
    flat, n, q = planes.reshape(-1), width * height, width * height // 4
    return flat[n:n + q].reshape(height // 2, width // 2), flat[n + q:n + 2 * q].reshape(height // 2, width // 2)


@functools.lru_cache(maxsize=None)
def _bt601(device: torch.device) -> torch.Tensor:
    """BT601 on a device, made once per device: a per-frame host->device copy would sync the GPU."""
    return torch.as_tensor(BT601, dtype=torch.float32, device=device)


@torch.no_grad()
def yuv420_device(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The same on a torch device: HxWx3 uint8 -> (h*3/2, w) uint8 I420 planes, so only those cross to the host.
    Resize with antialiasing (cheap on a GPU), the BT.601 matrix, 2x2 chroma averaging."""
    w, h = size
    x = rgb.permute(2, 0, 1)[None].float()
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    m = _bt601(x.device)
    y = torch.einsum("c,bchw->bhw", m[0, :3], x) + m[0, 3]
    uv = torch.einsum("kc,bchw->bkhw", m[1:, :3], F.avg_pool2d(x, 2)) + m[1:, 3, None, None]
    planes = torch.cat([y.reshape(-1), uv.reshape(-1)]).round_().clamp_(0, 255).to(torch.uint8)
    return planes.reshape(h * 3 // 2, w)


class StreamFrames:
    """One per session: each output image -> the yuv420p av.VideoFrame to send, at the streamed size."""

    def __init__(self, stream_max: int = 720):
        self.stream_max = stream_max

    def size(self, width: int, height: int) -> tuple[int, int]:
        return stream_size(width, height, self.stream_max)

    def __call__(self, image: np.ndarray | torch.Tensor) -> av.VideoFrame:
        """`image`: HxWx3 uint8 RGB, a host array or a tensor on its device (converted there)."""
        size = self.size(image.shape[1], image.shape[0])
        planes = yuv420_device(image, size).cpu().numpy() if isinstance(image, torch.Tensor) else \
            yuv420_host(np.ascontiguousarray(image), size)
        return av.VideoFrame.from_ndarray(planes, format="yuv420p")


# ---- encoders and decoders ----

# Chosen by `launch.py bench live`: the fastest settings that stay within 1 dB of aiortc's VP8 (the measurements and
# why x264's ultrafast with its deblocking filter and subpixel refinement 1 wins: docs/benchmarks.md).
H264_PRESET, H264_PARAMS = "ultrafast", "deblock=0,0:subme=1"
VP8_CPU_USED = -12  # libvpx realtime speed, fixed (negative); aiortc uses -6
VP8_NOISE_SENSITIVITY = 0  # aiortc's 4 runs a temporal denoiser: it costs time and blurs what it sends
THREADS = 1  # one codec thread per session: sessions already encode (aiortc's executor) and decode side by side


def _stale(codec: av.VideoCodecContext | None, frame: av.VideoFrame, bitrate: int) -> bool:
    """aiortc's rule for rebuilding an encoder: none yet, a new size, or the target bitrate moved by over 10%."""
    return codec is None or (frame.width, frame.height) != (codec.width, codec.height) or \
        abs(bitrate - codec.bit_rate) / codec.bit_rate > 0.1


class FastH264Encoder(H264Encoder):
    """aiortc's H.264 encoder (its packetisation, keyframes and bitrate rule) with x264 set up for live video:
    a fast preset, tune=zerolatency, constrained baseline, no B-frames, one thread, and a VBV bound at the target
    bitrate (aiortc sets none, so x264 overshoots on motion)."""

    preset, params = H264_PRESET, H264_PARAMS

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool) -> Iterator[bytes]:
        if _stale(self.codec, frame, self.target_bitrate):  # built here, so aiortc's code keeps it
            self.codec = c = av.CodecContext.create("libx264", "w")
            c.width, c.height, c.pix_fmt = frame.width, frame.height, "yuv420p"
            c.bit_rate = self.target_bitrate
            c.framerate, c.time_base = fractions.Fraction(FRAME_RATE, 1), fractions.Fraction(1, FRAME_RATE)
            c.profile, c.max_b_frames, c.thread_count = "Baseline", 0, THREADS
            c.options = {"preset": self.preset, "tune": "zerolatency", "level": "31",
                         "maxrate": str(self.target_bitrate), "bufsize": str(self.target_bitrate),
                         **({"x264-params": self.params} if self.params else {})}
        yield from super()._encode_frame(frame, force_keyframe)


class TunedVp8Encoder(Vp8Encoder):
    """aiortc's VP8 encoder with its libvpx settings, but the speed, denoiser and threads chosen here."""

    cpu_used, noise_sensitivity = VP8_CPU_USED, VP8_NOISE_SENSITIVITY

    def encode(self, frame: av.VideoFrame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        if _stale(self.codec, frame, self.target_bitrate):  # built here, so aiortc's code keeps it
            self.codec = c = av.CodecContext.create("libvpx", "w")
            c.width, c.height, c.pix_fmt = frame.width, frame.height, "yuv420p"
            c.bit_rate, c.gop_size, c.qmin, c.qmax = self.target_bitrate, 3000, 2, 56
            c.thread_count = THREADS
            rate = str(self.target_bitrate)
            c.options = {"bufsize": rate, "minrate": rate, "maxrate": rate, "cpu-used": str(self.cpu_used),
                         "deadline": "realtime", "lag-in-frames": "0",
                         "noise-sensitivity": str(self.noise_sensitivity), "overshoot-pct": "15",
                         "partitions": "0", "static-thresh": "1", "undershoot-pct": "100"}
        return super().encode(frame, force_keyframe)


class FastVp8Decoder(Vp8Decoder):
    """FFmpeg's own VP8 decoder (aiortc uses libvpx's, slower: docs/benchmarks.md), on one thread."""

    def __init__(self) -> None:
        self.codec = av.CodecContext.create("vp8", "r")
        self.codec.thread_count = THREADS


class FastH264Decoder(H264Decoder):
    """aiortc's H.264 decoder on one thread: sessions already decode side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.codec.thread_count = THREADS


def to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded webcam frame -> HxWx3 uint8 RGB: cv2's BT.601 I420 conversion, faster than PyAV's
    to_ndarray(format="rgb24"), which sets up a new SwsContext for every frame."""
    if frame.format.name != "yuv420p":
        return frame.to_ndarray(format="rgb24")
    return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2RGB_I420)


def make_decoder(codec: RTCRtpCodecParameters) -> Decoder:
    """aiortc's get_decoder, with the faster video decoders."""
    mime = codec.mimeType.lower()
    if mime == "video/h264":
        return FastH264Decoder()
    if mime == "video/vp8":
        return FastVp8Decoder()
    return get_decoder(codec)


def make_encoder(codec: RTCRtpCodecParameters) -> Encoder:
    """aiortc's get_encoder, with the tuned video encoders."""
    mime = codec.mimeType.lower()
    if mime == "video/h264":
        return FastH264Encoder()
    if mime == "video/vp8":
        return TunedVp8Encoder()
    return get_encoder(codec)


def install() -> None:
    """Make every aiortc sender build its encoder with make_encoder, and every receiver its decoder with
    make_decoder. RTCRtpSender calls the name `get_encoder` in its own module when its first frame arrives, and
    the receiver's decoder thread `get_decoder` in its own: those two names are the patch points. Idempotent."""
    aiortc.rtcrtpsender.get_encoder = make_encoder
    aiortc.rtcrtpreceiver.get_decoder = make_decoder


# ---- which codec is negotiated ----

def codec_preferences(codec: str) -> list:
    """aiortc's video codec capabilities in the order for `codec`: "h264" = H.264 (constrained baseline first),
    then VP8 as the fall-back; "vp8" = VP8 only. RTX follows, for retransmissions."""
    caps = RTCRtpSender.getCapabilities("video").codecs
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r}: expected one of {CODECS}")

    def rank(c) -> int:
        name = c.mimeType.lower()
        if name == "video/h264":
            return 0 if c.parameters.get("profile-level-id") == "42e01f" else 1
        return {"video/vp8": 2, "video/rtx": 3}.get(name, 4)
    keep = {"h264": (0, 1, 2, 3), "vp8": (2, 3)}[codec]
    return sorted((c for c in caps if rank(c) in keep), key=rank)


def prefer_codec(transceiver: RTCRtpTransceiver, codec: str) -> None:
    """Order (and for "vp8" restrict) the codecs a server-side video transceiver negotiates. aiortc negotiates an
    answer inside setRemoteDescription, so the transceiver must exist first: `pc.addTransceiver("video",
    "sendrecv")`, then this, then setRemoteDescription (the offer's video takes this transceiver, and a later
    addTrack of the outgoing track reuses it)."""
    transceiver.setCodecPreferences(codec_preferences(codec))


def negotiated_codec(sdp: str) -> str | None:
    """The codec a session description's first video section sends with ("H264", "VP8"), or None."""
    for media in SessionDescription.parse(sdp).media:
        if media.kind == "video" and media.rtp.codecs:
            return media.rtp.codecs[0].name
    return None
