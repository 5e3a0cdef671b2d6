"""`launch.py bench live` end to end on a tiny run: the real stages (aiortc's decoders, the face stack, the tiny
engine with recipe weights, paste-back, conversion, aiortc's and the tuned encoders) and the JSON it promises."""
import json
import subprocess
import sys

from conftest import ROOT

STAGES = {"decode", "face", "engine", "paste", "convert", "encode", "viewer"}


def test_bench_live_smoke_writes_the_rows(tmp_path):
    out = tmp_path / "live.json"
    proc = subprocess.run([sys.executable, "launch.py", "bench", "live", "--weights", "recipe", "--config", "tiny",
                           "--device", "cpu", "--frames", "4", "--warmup", "1", "--quality-frames", "8",
                           "--portraits", "512,768", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["live"]
    assert "| 768² | vp8 aiortc, full size, rgb24 (today) | 768×768 |" in proc.stdout  # the markdown table
    for size, stream in ((512, [512, 512]), (768, [720, 720])):
        mine = [r for r in rows if r["portrait"] == size]
        assert len(mine) == 9 and sum(r["reference"] for r in mine) == 1
        ref = next(r for r in mine if r["reference"])
        assert ref["codec"] == "vp8" and ref["stream_size"] == [size, size] and ref["ratio"] == 1.0
        for r in mine:
            assert r["codec"] in ("vp8", "h264") and set(r["stages"]) == STAGES == set(r["p95"])
            assert r["reference"] or r["stream_size"] == stream
            assert all(v >= 0 for v in r["stages"].values()) and r["stages"]["engine"] > 0
            assert 0 < r["total_ms"] < r["outside_engine_ms"]  # decode + paste + convert + encode, then + face
            assert r["kbps"] > 0 and r["psnr_y_db"] > 20 and r["natural_psnr_y_db"] > 30
            assert r["viewer_ms"] == r["stages"]["viewer"] > 0  # what one more viewer costs per frame
        assert len({r["stages"]["face"] for r in mine}) == 1  # one face track per frame, shared by every row
