"""Where users run the app, in real Chromium and on loopback only: HTTPS (self-signed) at a name that is not
localhost; the notice on a page that is not a secure context; WebRTC relayed by a TURN server (Debian's coturn);
and the page's own fallback to HTTP streaming when WebRTC cannot connect.

The test host name lp.test is mapped to 127.0.0.1 inside Chromium (--host-resolver-rules), so the page's origin
is https://lp.test:PORT, not localhost. Needs Chromium and /usr/bin/turnserver (apt-get install chromium coturn);
the TURN test is skipped without coturn unless LP_REQUIRE_BROWSER=1."""
import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import time

import pytest
from cryptography import x509

from conftest import ROOT, run, tiny
from test_e2e_browser import (CHROMIUM, FLAGS, Held, free_port, sync_playwright, wait_closed, wait_until, webcam_frames,
                              write_y4m)

HOST = "lp.test"
TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
CONF = re.compile(r"<!-- turnserver.conf: begin -->\n```ini\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def engine(loopback_only):
    """ICE over loopback for the servers of this module (the fixture's name is older than the workers)."""
    import aioice.ice

    with pytest.MonkeyPatch.context() as mp:
        # ICE over loopback only: aioice normally skips 127.0.0.1 (the fallback test takes even that away)
        mp.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
        yield


@contextlib.contextmanager
def serve(engine, workdir, ice_servers=None, ssl=None):
    from web.app import LiveApp
    app = LiveApp(tiny(ice_servers=ice_servers or []), untrained=True, workdir=workdir)
    port = free_port()
    demo = app.launch(port=port, block=False, ssl=ssl)
    try:
        yield app, port
    finally:
        demo.close()
        app.close()


@pytest.fixture(scope="module")
def https(engine, tmp_path_factory):
    """The app over HTTPS with --https-self-signed's certificate (made for lp.test too): (app, port, cert)."""
    from web.tls import self_signed
    certfile, keyfile, cert, created = self_signed(HOST, tmp_path_factory.mktemp("tls"))
    assert created
    with serve(engine, tmp_path_factory.mktemp("https"), ssl=(certfile, keyfile)) as (app, port):
        yield app, port, cert


@pytest.fixture(scope="module")
def turn(loopback_only, tmp_path_factory):
    """coturn with docs/deploy.md's configuration, moved to 127.0.0.1 (and allowed to relay between loopback
    peers): its URL and its shared secret (static-auth-secret)."""
    if not os.path.exists(TURNSERVER):
        if os.environ.get("LP_REQUIRE_BROWSER") == "1":
            pytest.fail("LP_REQUIRE_BROWSER=1 but coturn is not installed (apt-get install coturn)", pytrace=False)
        pytest.skip("coturn is not installed (apt-get install coturn)")
    d, port = tmp_path_factory.mktemp("turn"), free_port()
    conf = CONF.search((ROOT / "docs" / "deploy.md").read_text())[1].replace("APP-SERVER-IP", "127.0.0.1")
    secret = re.search(r"^static-auth-secret=(.+)$", conf, re.M)[1]
    (d / "turnserver.conf").write_text(conf.replace("listening-port=3478", f"listening-port={port}"))
    log = d / "turn.log"
    proc = subprocess.Popen([TURNSERVER, "-c", str(d / "turnserver.conf"), "--listening-ip=127.0.0.1",
                             "--relay-ip=127.0.0.1", "--allow-loopback-peers", f"--pidfile={d / 'turn.pid'}",
                             f"--log-file={log}", "--simple-log"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: log.exists() and "Total General servers" in log.read_text(), 30)
        yield {"urls": f"turn:127.0.0.1:{port}", "secret": secret}
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def turned(engine, turn, tmp_path_factory):
    """The app over plain HTTP with the TURN server as its only ICE server, given its shared secret (--turn-secret):
    (app, port)."""
    from web.webrtc import turn_server
    ice = turn_server(turn["urls"], None, None, turn["secret"])
    with serve(engine, tmp_path_factory.mktemp("turned"), ice_servers=ice) as served:
        yield served


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    y4m = tmp_path_factory.mktemp("webcam") / "cam.y4m"
    write_y4m(y4m, webcam_frames())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS + [
            f"--use-file-for-fake-video-capture={y4m}", "--ignore-certificate-errors",
            f"--host-resolver-rules=MAP {HOST} 127.0.0.1"])
        yield browser
        browser.close()


def open_page(browser, app, url, init_script=None):
    """A new tab at `url`, registered with the server: (page, its tab on the worker, JS errors logged so far)."""
    page = browser.new_page(viewport={"width": 1360, "height": 1020})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    if init_script:
        page.add_init_script(init_script)
    page.goto(url)
    page.wait_for_function("() => document.querySelector('.lp-start') && window.lpLive")
    wait_until(lambda: app.pages, 30)
    (session,) = app.pages
    return page, Held(app.workers[0].worker, session), errors


def test_https_self_signed_at_a_host_name(https, browser):
    from web.tls import fingerprint
    app, port, cert = https
    served = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())
    assert fingerprint(served) == fingerprint(cert)  # the server presents --https-self-signed's certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {HOST, "localhost"} <= set(san.get_values_for_type(x509.DNSName))

    page, tab, errors = open_page(browser, app, f"https://{HOST}:{port}/")
    assert page.evaluate("[window.isSecureContext, location.origin]") == [True, f"https://{HOST}:{port}"]
    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.frames >= 10 && window.lpLive.route", timeout=120_000, polling=250)
    live = page.evaluate("window.lpLive")
    assert live["state"] == "connected" and live["transport"] == "WebRTC" and live["route"].startswith("direct")
    assert tab.pipeline.transport == "WebRTC" and tab.pipeline.metrics.frames_out >= 10
    assert (live["width"], live["height"]) == (512, 512)
    assert not errors
    page.close()
    wait_closed(app)


def test_insecure_origin_explains_and_disables_the_camera(turned, browser):
    app, port = turned
    page, tab, errors = open_page(browser, app, f"http://{HOST}:{port}/")
    assert page.evaluate("window.isSecureContext") is False
    notice = page.locator("#lp-live .lp-notice")
    notice.wait_for(state="visible")
    text = notice.inner_text()
    for remedy in ["HTTPS or from localhost", "--https-self-signed", "--ssl-certfile", f"https://{HOST}:{port}",
                   f"ssh -N -L {port}:localhost:{port} {HOST}", f"http://localhost:{port}", "--share"]:
        assert remedy in text
    assert page.locator(".lp-start").is_disabled()
    assert "camera blocked" in page.evaluate("window.lpLive.state")

    page.get_by_role("tab", name="Live (HTTP streaming)").click()
    http_notice = page.locator("#lp-http-note .lp-notice")
    http_notice.wait_for(state="visible")
    assert "--https-self-signed" in http_notice.inner_text()
    grant = page.locator('#lp-http-cam [title="grant webcam access"] > button')
    wait_until(grant.is_disabled, 10)
    assert not tab.placed and not errors, errors  # it never went live: no worker holds it
    page.close()
    wait_closed(app)


RELAY_ONLY = """{  // this page's WebRTC may only use TURN relay candidates
    const Native = window.RTCPeerConnection;
    window.RTCPeerConnection = function (config) { return new Native({...config, iceTransportPolicy: "relay"}); };
    window.RTCPeerConnection.prototype = Native.prototype;
}"""


def test_webrtc_through_a_turn_relay(turned, browser):
    app, port = turned
    page, tab, errors = open_page(browser, app, f"http://127.0.0.1:{port}/", init_script=RELAY_ONLY)
    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.frames >= 10 && window.lpLive.route", timeout=120_000, polling=250)
    live = page.evaluate("window.lpLive")
    assert live["state"] == "connected" and live["route"] == "relay (TURN)"
    pc = tab.conn.peer.pc  # the server's aiortc peer was given the same TURN server and holds a relay candidate
    gatherer = pc.getTransceivers()[0].receiver.transport.transport.iceGatherer
    assert "relay" in {c.type for c in gatherer.getLocalCandidates()}
    assert tab.pipeline.transport == "WebRTC" and tab.pipeline.metrics.frames_out >= 10
    assert not errors, errors
    page.close()
    wait_closed(app)


def test_unreachable_stun_server_does_not_stall(engine, browser, tmp_path):
    """A STUN server that never answers (both sides are given it): gathering is bounded, WebRTC still connects
    directly, and the page does not fall back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        with serve(engine, tmp_path, ice_servers=[{"urls": "stun:127.0.0.1:%d" % hole.getsockname()[1]}]) as (app, port):
            page, tab, errors = open_page(browser, app, f"http://127.0.0.1:{port}/")
            page.click(".lp-start")
            page.wait_for_function("() => window.lpLive.frames >= 5 && window.lpLive.route", timeout=120_000, polling=250)
            live = page.evaluate("window.lpLive")
            assert live["transport"] == "WebRTC" and not live["fallback"] and live["route"].startswith("direct")
            hole.setblocking(False)
            asked = set()
            with contextlib.suppress(BlockingIOError):
                for _ in range(1000):
                    asked.add(hole.recvfrom(2048)[1])
            assert len(asked) >= 2  # the browser and the server both sent it binding requests
            print(f"first frame {live['firstFrameMs']} ms after start with an unreachable STUN server")
            assert not errors, errors
            page.close()
            wait_closed(app)


def test_falls_back_to_http_streaming_and_back(https, browser, monkeypatch):
    import aioice.ice
    app, port, _ = https
    # the server's aioice has no host address: offers are answered, but ICE can never connect
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: [])
    page, tab, errors = open_page(browser, app, f"https://{HOST}:{port}/")
    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.transport === 'HTTP streaming'", timeout=15_000, polling=100)
    wait_until(lambda: tab.placed and tab.pipeline and tab.pipeline.transport == "HTTP streaming"
               and tab.pipeline.metrics.frames_out >= 5, 90)
    note = page.locator("#lp-http-note .lp-notice")
    assert "WebRTC did not work (no video within 10 s" in note.inner_text()
    assert page.get_by_role("tab", name="Live (HTTP streaming)").get_attribute("aria-selected") == "true"
    page.wait_for_function("() => document.querySelector('#lp-metrics').textContent.includes('Live via HTTP streaming')")
    first = page.locator("#lp-http-view img").get_attribute("src")
    page.wait_for_function("(src) => document.querySelector('#lp-http-view img').src !== src", arg=first)
    wait_until(lambda: not app.workers[0].worker.counts()["peers"], 60)  # the server closes the peer that never connected

    monkeypatch.undo()  # the network is back: "Try WebRTC again" goes live over WebRTC and stops HTTP streaming
    http = tab.pipeline
    page.get_by_role("button", name="Try WebRTC again").click()
    page.wait_for_function("() => window.lpLive.frames >= 5", timeout=60_000, polling=250)
    assert tab.pipeline.transport == "WebRTC" and http.closed
    frames = tab.pipeline.metrics.frames_out
    time.sleep(2)
    assert tab.pipeline.transport == "WebRTC" and tab.pipeline.metrics.frames_out > frames  # not taken back by HTTP
    assert not errors, errors
    page.close()
    wait_closed(app)
