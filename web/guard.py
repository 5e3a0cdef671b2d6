"""Checks a POST /offer passes before it may touch a tab: login, content type, origin, body size, offer shape.

/offer is a plain FastAPI route next to Gradio's, so it does what Gradio's own routes do for itself: with --auth it
looks up the user from Gradio's access-token cookie (or the app's auth dependency) and answers 401 without one.
Everything else is refused with a 4xx before a peer connection or a pipeline exists, so a stranger's or a broken
offer can neither end a tab's working connection nor leave anything behind.
"""
from __future__ import annotations

import inspect
import json
import secrets
from urllib.parse import urlsplit

import fastapi
from aiortc import sdp
from aiortc.codecs import CODECS
from aiortc.rtcpeerconnection import find_common_codecs

MAX_OFFER_BYTES = 64 * 1024  # a browser's offer with every ICE candidate is ~3-10 KB
MAX_MEDIA_SECTIONS = 8  # the page sends one video section; room for a browser that adds audio/data
MAX_SESSION_CHARS = 128  # Gradio's session hashes are ~11 characters, page secrets 32
FIELDS = ("sdp", "type", "session", "secret")
VIEW_FIELDS = ("sdp", "type")  # a viewer's offer: the token is in its URL


class Refused(Exception):
    """A request /offer answers with a 4xx: `status` and a message meant for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def gradio_user(request: fastapi.Request) -> str | None:
    """The logged-in user as Gradio's own routes see it (its auth dependency, else its access-token cookie)."""
    app = request.app
    if getattr(app, "auth_dependency", None) is not None:
        user = app.auth_dependency(request)
        return await user if inspect.isawaitable(user) else user
    cookie = getattr(app, "cookie_id", "")
    token = request.cookies.get(f"access-token-{cookie}") or request.cookies.get(f"access-token-unsecure-{cookie}")
    return getattr(app, "tokens", {}).get(token)


def login_required(request: fastapi.Request) -> bool:
    return getattr(request.app, "auth", None) is not None or getattr(request.app, "auth_dependency", None) is not None


def same_origin(request: fastapi.Request) -> bool:
    """No Origin (not a browser) or one naming this host: the scheme may differ (HTTPS in front of the app)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    hosts = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")} - {""}
    return urlsplit(origin).netloc.lower() in {h.split(",")[0].strip().lower() for h in hosts}


def same_secret(expected: str, given: object) -> bool:
    """Whether `given` is the secret `expected`, in constant time; any text (non-ASCII, lone surrogates) or any other
    type is just a wrong secret."""
    return isinstance(given, str) and secrets.compare_digest(expected.encode(), given.encode("utf-8", "surrogatepass"))


async def read_body(request: fastapi.Request, limit: int = MAX_OFFER_BYTES) -> bytes:
    """The request body, refused with 413 as soon as it is larger than `limit` (without reading the rest)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refused(413, f"the offer is larger than {limit // 1024} KB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Refused(413, f"the offer is larger than {limit // 1024} KB")
    return bytes(body)


def parse_offer(body: bytes, view: bool = False) -> dict:
    """{sdp, type, session, secret} with an SDP aiortc can answer: a video section the browser sends on, in a codec we
    decode, with ICE credentials and RTCP mux. A viewer's offer (`view`) is {sdp, type} with a video section it
    receives on instead. Raises Refused(400) saying what is wrong."""
    fields = VIEW_FIELDS if view else FIELDS
    shape = "{" + ", ".join(fields) + "}"
    try:
        offer = json.loads(body)
    except (ValueError, RecursionError):
        raise Refused(400, f"expected JSON {shape}") from None
    if not isinstance(offer, dict) or not all(isinstance(offer.get(k), str) for k in fields):
        raise Refused(400, f"expected JSON {shape} ({'four' if len(fields) == 4 else 'two'} strings)")
    if offer["type"] != "offer":
        raise Refused(400, f"expected type 'offer', got {offer['type'][:20]!r}")
    if not view and not (0 < len(offer["session"]) <= MAX_SESSION_CHARS
                         and 0 < len(offer["secret"]) <= MAX_SESSION_CHARS):
        raise Refused(400, "bad session id or secret")
    try:
        description = sdp.SessionDescription.parse(offer["sdp"])
    except Exception as e:  # the parser raises whatever its input provokes (ValueError, IndexError, KeyError...)
        raise Refused(400, f"bad offer: the SDP does not parse ({type(e).__name__})") from None
    media = description.media
    if not 0 < len(media) <= MAX_MEDIA_SECTIONS:
        raise Refused(400, f"bad offer: {len(media)} media sections")
    for m in media:
        if not (m.ice.usernameFragment and m.ice.password):
            raise Refused(400, "bad offer: ICE username fragment or password is missing")
        if m.kind in ("audio", "video") and not m.rtcp_mux:
            raise Refused(400, "bad offer: RTCP mux is not enabled")
        if not m.dtls or not m.dtls.fingerprints:
            raise Refused(400, "bad offer: no DTLS fingerprint")
    directions, wanted = ((("recvonly",), "no video to receive only (a recvonly video section") if view else
                          (("sendrecv", "sendonly"), "no webcam video (a sendrecv video section"))
    if not any(m.kind == "video" and m.direction in directions
               and find_common_codecs(CODECS["video"], m.rtp.codecs) for m in media):
        raise Refused(400, f"bad offer: {wanted} in VP8 or H.264)")
    return offer


async def check_offer(request: fastapi.Request, view: bool = False) -> dict:
    """Every check, cheapest first; the validated offer, or Refused. A viewer's offer (`view`) needs no login:
    its link's token is the permission to watch (and grants nothing else)."""
    if not view and login_required(request) and await gradio_user(request) is None:
        raise Refused(401, "log in first")
    if not same_origin(request):
        raise Refused(403, "cross-origin request refused")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise Refused(415, "expected Content-Type: application/json")
    return parse_offer(await read_body(request), view)
