"""Every CPU vector path is correct, not only the widest one this machine picks.

The path is chosen once when the module loads (SIMPLENET_FAST_CPU_ISA caps it), so each path
runs in its own interpreter.
"""
import json
import os
import subprocess
import sys

import pytest

from simplenet_fast import build_info

pytestmark = pytest.mark.skipif(not build_info()["compiled"], reason="simplenet_fast._C is not built")

SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import randomize_head, random_features, relative_error
from simplenet_fast import SimpleNetHead, build_info
g = torch.Generator().manual_seed(int(sys.argv[2]))
errors = {}
for name, config, grid2, grid3, batch in [
    ("paper", {}, (36, 36), (18, 18), 1),
    ("odd", dict(channels=(40, 112), pretrain_embed_dim=300, target_embed_dim=199, hidden=130), (35, 37), (18, 19), 3),
    ("tiny", dict(channels=(3, 5), pretrain_embed_dim=7, target_embed_dim=5, hidden=17), (1, 2), (1, 1), 2),
]:
    head = randomize_head(SimpleNetHead(**config), g)
    features = random_features(head.channels, batch, grid2, grid3, g)
    with torch.no_grad():
        errors[name] = relative_error(head.patch_scores(features, fused=True), head.patch_scores(features, fused=False))
print(json.dumps({"isa": build_info()["cpu_isa"], "errors": errors}))
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_narrower_cpu_paths_match_the_reference(isa, generator, tmp_path):
    if isa == "avx2" and build_info()["cpu_isa"] == "scalar":
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, SIMPLENET_FAST_CPU_ISA=isa)
    seed = str(generator.initial_seed() % 2**31)
    # cwd elsewhere: `python -c` puts the working directory first on sys.path, and a source
    # checkout there would shadow the installed (compiled) package.
    out = subprocess.run([sys.executable, "-c", SCRIPT, os.path.dirname(__file__), seed], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["isa"] == isa
    for name, error in report["errors"].items():
        assert error < 1e-4, (name, error)
