"""HTTPS and ICE options: the self-signed certificate (names, reuse, renewal, private key), the TURN flags, and
`launch.py --https-self-signed` serving the page over HTTPS with the certificate whose fingerprint it printed."""
import os
import re
import socket
import ssl
import subprocess
import sys
import threading

import pytest
from cryptography import x509

import launch
from conftest import ROOT
from web.tls import advice, fingerprint, host_names, self_signed
from web.webrtc import turn_server


def san(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)) | {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}


def test_self_signed_certificate_covers_the_machine_and_is_reused(tmp_path):
    certfile, keyfile, cert, created = self_signed("lp.test", tmp_path)
    names, addresses = host_names("lp.test")
    assert created and {"lp.test", "localhost", socket.gethostname(), "127.0.0.1", "::1"} <= san(cert)
    assert names | addresses <= san(cert)
    assert keyfile.stat().st_mode & 0o777 == 0o600
    key = ssl.create_default_context()
    key.load_cert_chain(certfile, keyfile)  # the key belongs to the certificate

    again = self_signed("lp.test", tmp_path)
    assert not again[3] and fingerprint(again[2]) == fingerprint(cert)  # cached: the browser's exception holds
    assert not self_signed("", tmp_path)[3]  # every name of the machine is already in it
    other = self_signed("192.0.2.77", tmp_path)  # a name it lacks: a new certificate with both
    assert other[3] and fingerprint(other[2]) != fingerprint(cert) and "192.0.2.77" in san(other[2])

    text = advice(certfile, other[2], "lp.test", 7860, created=False)
    assert "https://lp.test:7860" in text and fingerprint(other[2]) in text and "Proceed" in text


def test_turn_flags():
    assert turn_server(None, None, None) == []
    assert turn_server("turn:t.example:3478", "u", "p") == [
        {"urls": "turn:t.example:3478", "username": "u", "credential": "p"}]
    with pytest.raises(ValueError, match="turn-user"):
        turn_server("turn:t.example:3478", "u", None)
    with pytest.raises(ValueError, match="expected turn:"):
        turn_server("stun:t.example:3478", "u", "p")
    assert turn_server("turn:t.example:3478", None, None, "s3cret") == [{"urls": "turn:t.example:3478", "secret": "s3cret"}]
    with pytest.raises(ValueError, match="not both"):
        turn_server("turn:t.example:3478", "u", None, "s3cret")
    with pytest.raises(ValueError, match="--turn-secret needs --turn-url"):
        turn_server(None, None, None, "s3cret")


def test_turn_secret_mints_expiring_credentials():
    """coturn's shared-secret scheme: user name = expiry (Unix time), password = base64(HMAC-SHA1(secret, user
    name)); each entry with a secret is replaced, and the secret is given to nobody."""
    import base64, hashlib, hmac, time
    from web.webrtc import TURN_TTL_S, mint
    stun = {"urls": "stun:t.example:3478"}
    (same, turn) = mint([stun, {"urls": "turn:t.example:3478", "secret": "s3cret"}])
    assert same == stun and set(turn) == {"urls", "username", "credential"}
    expiry = int(turn["username"].split(":")[0])
    assert time.time() < expiry <= time.time() + TURN_TTL_S
    assert turn["credential"] == base64.b64encode(hmac.new(b"s3cret", turn["username"].encode(), hashlib.sha1).digest()).decode()


@pytest.mark.parametrize("flags, message", [
    (["--turn-url", "turn:127.0.0.1:3478"], "--turn-url needs --turn-secret (or $LP_TURN_SECRET), or --turn-user and --turn-password"),
    (["--turn-secret", "s"], "--turn-secret needs --turn-url"),
    (["--turn-url", "turn:127.0.0.1:3478", "--turn-secret", "s", "--turn-user", "u"], "not both"),
    (["--https-self-signed", "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"], "not both"),
    (["--ssl-certfile", "c.pem"], "go together"),
    (["--ssl-certfile", "missing.pem", "--ssl-keyfile", "key.pem"], "--ssl-certfile missing.pem: no such file"),
])
def test_bad_option_combinations_exit_before_loading(flags, message, capsys, monkeypatch):
    monkeypatch.delenv("LP_TURN_PASSWORD", raising=False)
    monkeypatch.delenv("LP_TURN_SECRET", raising=False)
    assert launch.main(["--weights", "recipe", "--config", "tiny", *flags]) == 2
    assert message in capsys.readouterr().err


def test_launch_https_self_signed(tmp_path, loopback_only):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "launch.py", "--weights", "recipe", "--config", "tiny",
                             "--https-self-signed", "--port", str(port)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, timer = "", threading.Timer(180, proc.kill)  # bounds the read below
    timer.start()
    try:
        for line in proc.stdout:
            out += line
            if "Running on local URL" in line or proc.poll() is not None:
                break
        printed = re.search(r"SHA-256 fingerprint ([0-9A-F:]{95})", out)
        assert printed and f"https://localhost:{port}" in out and "https://127.0.0.1" in out, out
        assert (tmp_path / "liveportrait-live" / "tls" / "cert.pem").exists()
        served = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())
        assert fingerprint(served) == printed[1]
    finally:
        timer.cancel()
        proc.terminate()
        proc.wait(30)
