"""state_dict keys, shapes and dtypes equal the official checkpoints (manifest.json), for all five files;
the recipe port reproduces the kit's per-key checksums."""
import json

import pytest
import torch

from conftest import DATA
from model.networks import NETWORK_NAMES, LivePortraitNetworks
from model.recipe import recipe_tensor

MANIFEST = json.loads((DATA / "manifest.json").read_text())["networks"]
NETS = LivePortraitNetworks("full")


def entries():
    for name in NETWORK_NAMES:
        yield name, getattr(NETS, name), MANIFEST[name]["keys"], ""
    for sub, spec in MANIFEST["stitching_retargeting_module"]["subdicts"].items():
        yield sub, NETS.stitching_retargeting_module[sub], spec["keys"], spec["recipe_key_prefix"]


@pytest.mark.parametrize("name,module,keys,prefix", list(entries()), ids=lambda v: v if isinstance(v, str) else "")
def test_state_dict_matches_manifest(name, module, keys, prefix):
    sd = module.state_dict()
    assert list(sd) == [k["key"] for k in keys]
    for k in keys:
        t = sd[k["key"]]
        assert list(t.shape) == k["shape"], k["key"]
        assert str(t.dtype) == "torch." + k["dtype"], k["key"]
    for k in keys[:: max(1, len(keys) // 25)]:  # recipe checksums on a spread of keys
        v = recipe_tensor(prefix + k["key"], k["shape"], 1, getattr(torch, k["dtype"])).double()
        assert v.sum().item() == pytest.approx(k["recipe_seed1_sum"], rel=1e-9, abs=1e-9)
        assert v.abs().sum().item() == pytest.approx(k["recipe_seed1_abs_sum"], rel=1e-9, abs=1e-9)


def test_strict_load_of_official_layout():
    """A state_dict with exactly the manifest's keys loads strictly into the full-size classes."""
    for name, module, keys, prefix in entries():
        sd = {k["key"]: recipe_tensor(prefix + k["key"], k["shape"], 2, getattr(torch, k["dtype"])) for k in keys}
        module.load_state_dict(sd, strict=True)
