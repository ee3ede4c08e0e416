"""Packaging: import hygiene (no optional dependency, no network at import or construction), entry point, the sdist's
contents."""

import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("taming", "diffusers", "vector_quantize_pytorch", "einx", "torchvision", "pytorch_lightning", "omegaconf", "accelerate", "stlpips_pytorch")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_import_touches_no_optional_dependency_and_no_network():
    """One fresh interpreter: ``import fdm`` imports no model family (the registry imports them when asked), and
    importing every family and the CLI imports no optional dependency and opens no connection."""
    result = _run(
        f"""
        import socket, sys
        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import torch
        import fdm
        print("FAMILIES", sorted(m for m in sys.modules if m.startswith("fdm.adapters")))
        import fdm.adapters, fdm.adapters.taming, fdm.adapters.put, fdm.adapters.diffusers, fdm.adapters.vector_quantize
        import fdm.cli
        module = fdm.FDM(8, hidden_channels=8, num_blocks=1)
        module(torch.zeros(1, 8, 2, 2))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r})
        print("LOADED", loaded)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "FAMILIES []" in result.stdout and "LOADED []" in result.stdout, result.stdout


def test_public_names():
    import fdm
    import fdm.adapter
    import fdm.dequantizer
    import fdm.masks
    import fdm.module
    import fdm.registry

    homes = {"FDM": fdm.module, "Dequantizer": fdm.dequantizer, "latent_mask": fdm.masks, "load_mask": fdm.masks,
             "random_irregular_mask": fdm.masks, "register_family": fdm.registry, "ModelFamily": fdm.registry,
             "find_adapter": fdm.registry, "VQAdapter": fdm.adapter}
    for name, home in homes.items():  # each exported name is the object of its one home module
        assert name in fdm.__all__ and getattr(fdm, name) is getattr(home, name), name


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "fdm.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("demo", "eval", "train", "finetune", "sample", "inpaint", "push"):
        assert command in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_sdist_carries_every_file_its_tests_and_docs_use(tmp_path):
    """An sdist built from this checkout holds every tracked file of tests/, benchmarks/, docs/ and examples/ (what
    pytest run from the unpacked sdist needs) and the demo's assets, and no training output."""
    build = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "sdist", "--dist-dir", str(tmp_path),
         "egg_info", "--egg-base", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (archive,) = tmp_path.glob("fdm_vq-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "tests", "benchmarks", "docs", "examples", "fdm/demo/assets"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert len(tracked) > 50
    assert sorted(set(tracked) - packed) == []
    assert not any(name.startswith(("runs/", "training-checkpoints/")) for name in packed)
