"""Find, fetch, verify and load the official LivePortrait checkpoints (HF repo KwaiVGI/LivePortrait) into
LivePortraitNetworks. Every failure becomes one WeightsError whose text tells the user what to do, because the
first thing a new user hits is a missing or half-downloaded 500 MB of weights, and a traceback does not help them."""
import hashlib
import os
import pickle
from pathlib import Path

import huggingface_hub
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .networks import NETWORK_NAMES, LivePortraitNetworks

REPO_ID = "KwaiVGI/LivePortrait"
STITCHING = "stitching_retargeting_module"
STITCHING_SUBS = ("retarget_shoulder", "retarget_mouth", "retarget_eye")
FILES = {name: f"liveportrait/base_models/{name}.pth" for name in NETWORK_NAMES}
FILES[STITCHING] = f"liveportrait/retargeting_models/{STITCHING}.pth"
# SPEC §3.1: exact bytes and sha256 from mirrors' git-LFS pointers; the stitching file has none.
EXPECTED: dict[str, tuple[int | None, str | None]] = {
    "appearance_feature_extractor": (3387959, "5279bb8654293dbdf327030b397f107237dd9212fb11dd75b83dfb635211ceb5"),
    "motion_extractor": (112545506, "251e6a94ad667a1d0c69526d292677165110ef7f0cf0f6d199f0e414e8aa0ca5"),
    "spade_generator": (221813590, "4780afc7909a9f84e24c01d73b31a555ef651521a1fe3b2429bd04534d992aee"),
    "warping_module": (182180086, "2f61a6f265fe344f14132364859a78bdbbc2068577170693da57fb96d636e282"),
    STITCHING: (None, None),
}


class WeightsError(Exception):
    """The weights cannot be used; str() is the whole multi-line, actionable message for the user."""


def _default_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "liveportrait-live" / "weights"


def resolve_root(weights: str | Path | None = None) -> Path:
    """Weights root: the --weights argument, else $LP_WEIGHTS, else the per-user cache directory."""
    chosen = weights or os.environ.get("LP_WEIGHTS") or _default_root()
    return Path(chosen).expanduser().absolute()


def _how(root: Path) -> str:
    if os.environ.get("LP_WEIGHTS") and resolve_root(os.environ["LP_WEIGHTS"]) == root:
        return "from $LP_WEIGHTS"
    return "the default cache directory" if resolve_root(_default_root()) == root else "given with --weights"


def _help(root: Path) -> str:
    return (f"Weights root: {root} ({_how(root)}; order: --weights DIR, then $LP_WEIGHTS, then {_default_root()}).\n"
            f"To get the files, run one of:\n"
            f"  hf download {REPO_ID} --local-dir {root} --include \"liveportrait/*\"\n"
            f"  python launch.py --weights DIR     (downloads into DIR when online)\n"
            f"or set LP_WEIGHTS to a directory that already holds liveportrait/base_models/*.pth and "
            f"liveportrait/retargeting_models/{STITCHING}.pth.")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, size: int | None, sha: str | None) -> str | None:
    """What is wrong with the file, or None. Size first (free); the hash once, remembered in a sidecar keyed
    by size and mtime so later starts do not reread 500 MB."""
    st = path.stat()
    if size is not None and st.st_size != size:
        return f"{path}: {st.st_size} bytes, expected {size} (truncated or a different file)"
    if sha is None:
        return None
    stamp, sidecar = f"{st.st_size} {st.st_mtime_ns} {sha}", path.with_name(path.name + ".sha256-ok")
    if sidecar.is_file() and sidecar.read_text().strip() == stamp:
        return None
    actual = _sha256(path)
    if actual != sha:
        return f"{path}: sha256 {actual}, expected {sha} (corrupt or a different file)"
    try:
        sidecar.write_text(stamp + "\n")
    except OSError:  # read-only weights directory: verify again next time
        pass
    return None


def ensure_weights(root: Path, download: bool = True,
                   expected: dict[str, tuple[int | None, str | None]] | None = None) -> dict[str, Path]:
    """Make sure the five official files are under root (downloading missing ones if allowed) and intact.
    `expected` overrides the (size, sha256) table, name -> (None, None) meaning unchecked."""
    root, expected = Path(root), EXPECTED if expected is None else expected
    paths = {name: root / rel for name, rel in FILES.items()}
    missing = [name for name, p in paths.items() if not p.is_file()]
    why = "downloading was not allowed"
    if missing and download and _offline():
        why = "HF_HUB_OFFLINE is set, so nothing was downloaded"
    elif missing and download:
        for name in list(missing):
            try:
                huggingface_hub.hf_hub_download(REPO_ID, FILES[name], local_dir=root)
                missing.remove(name)
            except Exception as e:  # offline, DNS, HTTP 404/5xx, disk full: all end in the same advice
                why = f"downloading from huggingface.co/{REPO_ID} failed: {type(e).__name__}: {str(e).strip()[:300]}"
                break  # the next files would fail the same way, each after its own retries
    if missing:
        raise WeightsError("LivePortrait weights are missing:\n"
                           + "".join(f"  {paths[n]}\n" for n in missing) + f"({why})\n" + _help(root))
    problems = [p for name, path in paths.items() if (p := _check(path, *expected.get(name, (None, None))))]
    if problems:
        raise WeightsError("LivePortrait weights are damaged:\n" + "".join(f"  {p}\n" for p in problems)
                           + "Delete these files and download them again.\n" + _help(root))
    return paths


def _read_pth(name: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict to load into `name`, read with weights_only so a hostile file cannot run code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path} holds pickled objects other than tensors and was NOT loaded "
                           f"(refusing to unpickle: {str(e).splitlines()[0]}).\n"
                           f"Delete it and download the official file again.") from None
    except Exception as e:  # truncated zip, EOF, bad header
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); it is probably truncated.\n"
                           f"Delete it and download it again.") from None
    if name == STITCHING:  # dict of sub-dicts whose keys carry the DDP "module." prefix
        if not (isinstance(ckpt, dict) and all(isinstance(ckpt.get(s), dict) for s in STITCHING_SUBS)):
            raise WeightsError(f"{path} lacks the sub-dicts {', '.join(STITCHING_SUBS)}; it is not the official "
                               f"stitching checkpoint. Delete it and download it again.")
        ckpt = {f"{s}.{k.replace('module.', '')}": v for s in STITCHING_SUBS for k, v in ckpt[s].items()}
    if not (isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values())):
        raise WeightsError(f"{path} is not a state dict of tensors. Delete it and download it again.")
    return ckpt


def _state_dict(name: str, path: Path) -> dict[str, torch.Tensor]:
    """From the beside-it .safetensors copy when that was made from this very .pth (size and mtime), else from the
    .pth, writing the copy for next time: safetensors loads faster and runs no unpickler at all."""
    st, cache = path.stat(), path.with_suffix(".safetensors")
    stamp = {"source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns)}
    try:
        with safe_open(cache, "pt") as f:
            if f.metadata() == stamp:
                return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError):  # no copy yet, or a damaged one: rebuild it
        pass
    sd = _read_pth(name, path)
    tmp = cache.with_suffix(".safetensors.tmp")
    try:  # clone: checkpoints may hold views of shared storages, which safetensors refuses
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, tmp, metadata=stamp)
        os.replace(tmp, cache)
    except OSError:  # read-only weights directory: keep loading the .pth
        pass
    return sd


def load_official(networks: LivePortraitNetworks, weights: str | Path | None = None, download: bool = True,
                  expected: dict[str, tuple[int | None, str | None]] | None = None) -> LivePortraitNetworks:
    """Resolve, fetch, verify and strictly load all five official checkpoints; returns networks in eval mode."""
    paths = ensure_weights(resolve_root(weights), download, expected)
    for name, path in paths.items():
        module = getattr(networks, name)
        try:
            module.load_state_dict(_state_dict(name, path), strict=True)
        except RuntimeError as e:
            raise WeightsError(f"{path} does not fit the {name} network ({networks.config} config):\n"
                               f"{str(e)[:2000]}\nDelete it and download the official file again.") from None
    return networks.eval()
