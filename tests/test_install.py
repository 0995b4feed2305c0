"""attn_ops imports and runs its kernels with Hugging Face's `kernels` distribution installed.

That distribution is a regular top-level package named `kernels`; a fake with the same shape
stands in for it (first on the path), so each case proves our kernels never resolve through the
top-level name: from a source checkout on PYTHONPATH (how the GPU machine runs the repo) and from
a wheel installed into the same folder as the fake, which must come out of it untouched.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Runs the fused kernels once (on CUDA, or interpreted), then prints what was imported from where.
PROBE = """
import os, torch, kernels, attn_ops
assert kernels.IS_THE_FAKE, "the top-level `kernels` must stay the other distribution's"
q = torch.randn(1, 1, 8, 16, device="cuda" if torch.cuda.is_available() else "cpu")
out = attn_ops.attention(q, q, q, causal=True, backend="triton")
torch.testing.assert_close(out, attn_ops.attention(q, q, q, causal=True, backend="reference"))
import attn_ops.kernels.attn_fwd as fwd
import sys
strays = [name for name in sys.modules if name.startswith("kernels.")]
assert not strays, f"our kernels were imported under the top-level name: {strays}"
print(attn_ops.__version__, os.path.realpath(attn_ops.__file__), os.path.realpath(fwd.__file__))
"""


@pytest.fixture
def fake_kernels(tmp_path):
    """An installable distribution whose import name is a regular package `kernels`, as Hugging Face's is."""
    source = tmp_path / "fake-kernels"
    (source / "kernels").mkdir(parents=True)
    (source / "kernels" / "__init__.py").write_text("IS_THE_FAKE = True\n")
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "kernels"\nversion = "0.0.1"\n[tool.setuptools]\npackages = ["kernels"]\n'
    )
    return source


def pip_install(source, target):
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)


def probe(pythonpath, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_source_checkout_on_the_path_after_hugging_face_kernels(fake_kernels, tmp_path):
    version, package, kernel = probe([fake_kernels, REPO], cwd=tmp_path)
    assert Path(package).parent == REPO / "attn_ops"
    assert Path(kernel).parent == REPO / "kernels"  # the design's folder, reached as attn_ops.kernels


def test_wheel_installed_beside_hugging_face_kernels(fake_kernels, tmp_path):
    # Asked in a subprocess, setuptools first: looking pip up before setuptools is imported switches
    # off setuptools' distutils shim (in this process, torch.compile's C++ builds need it later).
    if subprocess.run([sys.executable, "-c", "import setuptools, pip"], capture_output=True).returncode:
        pytest.skip("building a wheel needs pip and setuptools (the GPU machine may have neither)")
    site = tmp_path / "site"
    pip_install(fake_kernels, site)
    theirs = sorted(p.relative_to(site) for p in (site / "kernels").rglob("*"))
    checkout = tmp_path / "checkout"  # a copy: building in place would leave build/ in the repo
    shutil.copytree(REPO, checkout, symlinks=True, ignore=lambda folder, names: [
        n for n in names if Path(folder) == REPO and n not in ("pyproject.toml", "README.md", "attn_ops", "kernels")])
    pip_install(checkout, site)
    version, package, kernel = probe([site], cwd=tmp_path)
    assert Path(kernel).parent == site / "attn_ops" / "kernels"
    assert sorted(p.relative_to(site) for p in (site / "kernels").rglob("*")) == theirs  # untouched
    import attn_ops

    assert version == attn_ops.__version__
