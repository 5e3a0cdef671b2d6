"""Start-up: `python launch.py` without weights (the clear message, a non-zero exit, no traceback) and every bad
combination of flags (one line on stderr, exit 2, nothing loaded or served)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_launch_without_weights_explains_and_exits(tmp_path):
    env = {**os.environ, "LP_WEIGHTS": str(tmp_path / "nowhere"), "HF_HUB_OFFLINE": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}  # its work directory, not the user's
    proc = subprocess.run([sys.executable, "launch.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    for needed in ("appearance_feature_extractor.pth", str(tmp_path / "nowhere"), "KwaiVGI/LivePortrait",
                   "--weights", "LP_WEIGHTS"):
        assert needed in proc.stderr, needed


# Every bad start-up combination of the web app's flags: what is refused, and the one line that says why. Each
# stops before anything is loaded or served (the server would block: `served` fails the test instead).
COMBINATIONS = [
    (["--config", "tiny"], "--config tiny runs only with --weights recipe"),
    (["--config", "tiny", "--weights", "/somewhere"], "--config tiny runs only with --weights recipe"),
    (["--turn-url", "turn:127.0.0.1:3478"],
     "--turn-url needs --turn-secret (or $LP_TURN_SECRET), or --turn-user and --turn-password"),
    (["--https-self-signed", "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"], "not both"),
    (["--ssl-certfile", "c.pem"], "--ssl-certfile and --ssl-keyfile go together"),
    (["--ssl-certfile", "missing.pem", "--ssl-keyfile", "key.pem"], "--ssl-certfile missing.pem: no such file"),
    (["--work-dir", "{file}"], "--work-dir {file}: not a directory"),
    (["--work-dir", "{busy}"], "--work-dir {busy} is in use by another running server"),
]


@pytest.mark.parametrize("flags, message", COMBINATIONS, ids=[" ".join(f) for f, _ in COMBINATIONS])
def test_bad_start_up_combinations_are_one_line_and_exit_2(flags, message, tmp_path, capsys, monkeypatch):
    import launch
    from web import app, limits
    monkeypatch.delenv("LP_TURN_PASSWORD", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(app.LiveApp, "launch", lambda *a, **k: pytest.fail("served despite a bad combination"))
    (tmp_path / "file").write_text("not a directory")
    busy = limits.claim(tmp_path / "busy")  # another server's work directory  # noqa: F841
    paths = {"file": tmp_path / "file", "busy": tmp_path / "busy"}
    flags, message = [f.format(**paths) for f in flags], message.format(**paths)
    if "--config" not in flags:
        flags += ["--weights", "recipe", "--config", "tiny"]
    if "--work-dir" not in flags:
        flags += ["--work-dir", str(tmp_path / "work")]
    try:
        status = launch.main(flags)
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err and err.startswith("launch.py: error: "), err


def test_every_command_refuses_the_tiny_config_with_official_weights(capsys):
    import launch
    assert launch.main(["bench", "--config", "tiny", "--weights", "/somewhere", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == ("launch.py: error: --config tiny runs only with --weights recipe (untrained weights): the "
                   "official weights exist only for the full config\n"), err
