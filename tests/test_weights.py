"""model/weights.py on tiny-config checkpoints written in the official layout; the Hub is a local directory."""
import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from model import weights as W
from model.networks import NETWORK_NAMES, LivePortraitNetworks

UNCHECKED = {name: (None, None) for name in W.FILES}


@pytest.fixture(scope="module")
def source() -> LivePortraitNetworks:
    return LivePortraitNetworks("tiny").fill_recipe(1)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, source) -> Path:
    """A directory laid out like the HF repo, files saved the way the official checkpoints are."""
    hub = tmp_path_factory.mktemp("hub")
    for name in NETWORK_NAMES:
        (hub / W.FILES[name]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(getattr(source, name).state_dict(), hub / W.FILES[name])
    stitching = {sub: {f"module.{k}": v for k, v in net.state_dict().items()}
                 for sub, net in source.stitching_retargeting_module.items()}
    stitching["extra_top_level"] = {"ignored": torch.zeros(3)}
    (hub / W.FILES[W.STITCHING]).parent.mkdir(parents=True, exist_ok=True)
    torch.save(stitching, hub / W.FILES[W.STITCHING])
    return hub


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Offline, no user environment leaking in, and any real download attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LP_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def refuse(*args, **kwargs):
        raise AssertionError("tried to reach the network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


@pytest.fixture
def root(tmp_path, hub) -> Path:
    shutil.copytree(hub, tmp_path / "weights")
    return tmp_path / "weights"


def fake_download(hub: Path):
    """Test double of the remote: copies from the local hub into local_dir like hf_hub_download does."""
    def download(repo_id: str, filename: str, *, local_dir: Path, **kwargs) -> str:
        assert repo_id == "KwaiVGI/LivePortrait"
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(hub / filename, dst)
        return str(dst)
    return download


def assert_same(a: LivePortraitNetworks, b: LivePortraitNetworks) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_strict_load_reproduces_tensors(root, source):
    nets = LivePortraitNetworks("tiny")
    nets.train()
    assert not torch.equal(nets.lip.mlp[0].weight, source.lip.mlp[0].weight)
    out = W.load_official(nets, root, download=False, expected=UNCHECKED)
    assert out is nets and not nets.training
    assert_same(nets, source)


def test_missing_files_message(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(W.WeightsError) as e:
        W.ensure_weights(empty, download=True)
    msg = str(e.value)
    for rel in W.FILES.values():
        assert str(empty / rel) in msg
    assert str(empty) in msg and "HF_HUB_OFFLINE" in msg
    assert f'hf download KwaiVGI/LivePortrait --local-dir {empty} --include "liveportrait/*"' in msg
    assert "--weights DIR" in msg and "LP_WEIGHTS" in msg
    assert e.value.__context__ is None  # nothing underneath to leak into a traceback


def test_only_the_missing_file_is_reported(root):
    (root / W.FILES["warping_module"]).unlink()
    with pytest.raises(W.WeightsError) as e:
        W.ensure_weights(root, download=False, expected=UNCHECKED)
    msg = str(e.value)
    assert "warping_module.pth" in msg and "spade_generator.pth" not in msg
    assert "not allowed" in msg


def test_download_into_empty_root(monkeypatch, tmp_path, hub, source):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download(hub))
    monkeypatch.setenv("LP_WEIGHTS", str(tmp_path / "fresh"))
    nets = W.load_official(LivePortraitNetworks("tiny"), expected=UNCHECKED)
    assert all((tmp_path / "fresh" / rel).is_file() for rel in W.FILES.values())
    assert_same(nets, source)


def test_download_failure_is_a_weights_error(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def not_found(*args, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError("404 Client Error: Entry Not Found")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(W.WeightsError, match="EntryNotFoundError") as e:
        W.ensure_weights(tmp_path / "w")
    assert "hf download" in str(e.value)


def test_truncated_file_names_it(root):
    path = root / W.FILES["spade_generator"]
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(W.WeightsError, match="truncated") as e:
        W.load_official(LivePortraitNetworks("tiny"), root, download=False, expected=UNCHECKED)
    assert str(path) in str(e.value) and "download it again" in str(e.value)


def test_wrong_size_and_wrong_hash(root):
    path = root / W.FILES["motion_extractor"]
    size, sha = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(W.WeightsError, match="expected 7") as e:
        W.ensure_weights(root, download=False, expected={**UNCHECKED, "motion_extractor": (7, None)})
    assert str(path) in str(e.value) and f"{size} bytes" in str(e.value)
    with pytest.raises(W.WeightsError, match="sha256") as e:
        W.ensure_weights(root, download=False, expected={**UNCHECKED, "motion_extractor": (size, "0" * 64)})
    assert str(path) in str(e.value) and "Delete" in str(e.value)
    assert W.ensure_weights(root, download=False, expected={**UNCHECKED, "motion_extractor": (size, sha)})


def test_hash_checked_once_then_again_after_change(root, monkeypatch):
    path = root / W.FILES["motion_extractor"]
    expected = {**UNCHECKED, "motion_extractor": (None, hashlib.sha256(path.read_bytes()).hexdigest())}
    W.ensure_weights(root, download=False, expected=expected)
    assert path.with_name(path.name + ".sha256-ok").is_file()
    real = W._sha256
    monkeypatch.setattr(W, "_sha256", lambda p: pytest.fail("rehashed a verified file"))
    W.ensure_weights(root, download=False, expected=expected)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size, new content and mtime
    path.write_bytes(bytes(data))
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))  # distinct mtime even on coarse-clock filesystems
    monkeypatch.setattr(W, "_sha256", real)
    with pytest.raises(W.WeightsError, match="sha256"):
        W.ensure_weights(root, download=False, expected=expected)


class Payload:
    """Unpickling this creates the marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_object_is_refused_and_not_run(root, tmp_path):
    marker = tmp_path / "pwned"
    path = root / W.FILES["appearance_feature_extractor"]
    torch.save({"first.conv.weight": torch.zeros(1), "x": Payload(marker)}, path)
    with pytest.raises(W.WeightsError, match="NOT loaded") as e:
        W.load_official(LivePortraitNetworks("tiny"), root, download=False, expected=UNCHECKED)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_shape_mismatch_names_file(root):
    with pytest.raises(W.WeightsError, match="does not fit") as e:
        W.load_official(LivePortraitNetworks("full"), root, download=False, expected=UNCHECKED)
    assert "appearance_feature_extractor.pth" in str(e.value)


def test_root_resolution_order(monkeypatch, tmp_path):
    assert W.resolve_root() == tmp_path / "xdg" / "liveportrait-live" / "weights"
    monkeypatch.setenv("LP_WEIGHTS", str(tmp_path / "env"))
    assert W.resolve_root() == tmp_path / "env"
    assert W.resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert W.resolve_root(str(tmp_path / "arg")) == tmp_path / "arg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("LP_WEIGHTS")
    assert W.resolve_root() == Path.home() / ".cache" / "liveportrait-live" / "weights"


def test_safetensors_copy_used_on_second_load(root, source, monkeypatch):
    W.load_official(LivePortraitNetworks("tiny"), root, download=False, expected=UNCHECKED)
    assert all((root / rel).with_suffix(".safetensors").is_file() for rel in W.FILES.values())
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("re-read a .pth"))
    assert_same(W.load_official(LivePortraitNetworks("tiny"), root, download=False, expected=UNCHECKED), source)
    # a changed .pth makes its copy stale: it is read again
    path = root / W.FILES["warping_module"]
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(pytest.fail.Exception, match="re-read"):
        W.load_official(LivePortraitNetworks("tiny"), root, download=False, expected=UNCHECKED)
