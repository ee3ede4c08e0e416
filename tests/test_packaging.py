"""Packaging: import hygiene (no optional dependency, no network at import or construction), entry point."""

import subprocess
import sys
import textwrap

OPTIONAL = ("taming", "diffusers", "torchvision", "pytorch_lightning", "omegaconf", "accelerate", "stlpips_pytorch")


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
        import fdm.adapters, fdm.adapters.taming, fdm.adapters.put, fdm.adapters.diffusers, fdm.cli
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
             "find_adapter": fdm.adapter, "VQAdapter": fdm.adapter}
    for name, home in homes.items():  # each exported name is the object of its one home module
        assert name in fdm.__all__ and getattr(fdm, name) is getattr(home, name), name


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "fdm.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("demo", "eval", "train", "finetune", "sample", "inpaint", "push"):
        assert command in result.stdout
