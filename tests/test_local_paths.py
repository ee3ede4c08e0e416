"""A missing local path is a missing local path: fdm.io.hub.locate decides, without network access, what is local and
what is a Hugging Face Hub repo id, and every loader and every --config / --checkpoint / --fdm / --transformer
option fails at once with ``file not found: PATH`` instead of asking the Hub.

The rule is checked in this process; the entry points run in one fresh interpreter whose huggingface_hub talks
only to the local Hub stand-in (tests/hub_server.py, online mode), so any request they made would be logged there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_server import Blob, Repo
from test_cli_errors import PUT_CODEC, fdm_env

import fdm
from fdm.errors import HubError
from fdm.io.hub import locate, resolve_file


@pytest.mark.parametrize("source", [
    "logs/vqgan/configs/model.yaml",  # more than one slash
    "vqgan/model.yaml", "last.ckpt", "weights.SAFETENSORS", "codec.pth", "model.pt", "vq.bin", "config.json",  # suffix
    "./fdm", "../fdm", ".fdm", "/no/such/fdm", "~/no-such-fdm-folder",  # leading . / ~
    "a/b",  # ./a exists (created below)
    "fdm-name-only", "owner/bad name", "owner/a--b",  # neither a path nor a valid owner/name repo id
])
def test_missing_local_paths_fail_at_once(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        locate(source)
    assert str(info.value) == f"file not found: {source}"
    assert not isinstance(info.value, HubError)


def test_hub_ids_existing_paths_and_hf_references(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert locate("owner/fdm-vqgan") == "owner/fdm-vqgan"  # no ./owner: a Hub repo id
    assert locate("owner/Llama-3.1-8B") == "owner/Llama-3.1-8B"  # a dot is not a file suffix
    assert locate("hf://owner/repo/configs/model.yaml") == "owner/repo/configs/model.yaml"
    assert locate("hf://owner/repo") == "owner/repo"
    (tmp_path / "owner" / "fdm-vqgan").mkdir(parents=True)
    (tmp_path / "model.yaml").write_text("model: {}\n")
    assert locate("owner/fdm-vqgan") == Path("owner/fdm-vqgan")  # now a local folder
    assert locate("model.yaml") == Path("model.yaml")
    assert locate(Path("model.yaml")) == Path("model.yaml")
    with pytest.raises(FileNotFoundError, match="^file not found: owner/other$"):  # ./owner exists
        locate("owner/other")
    with pytest.raises(FileNotFoundError, match="^file not found: other/fdm$"):  # a Path is always local
        locate(Path("other/fdm"))
    with pytest.raises(HubError, match="hf://owner is not a Hugging Face Hub reference"):
        locate("hf://owner")


def test_resolve_file_refuses_files_for_folders_and_repo_ids_for_files(tmp_path):
    (tmp_path / "model.yaml").write_text("model: {}\n")
    with pytest.raises(IsADirectoryError, match="is a folder; expected a file"):
        resolve_file(tmp_path)
    with pytest.raises(fdm.CheckpointError, match="is a file; expected a folder holding config.json"):
        resolve_file(tmp_path / "model.yaml", "config.json")
    with pytest.raises(fdm.CheckpointError, match="is a file; expected a folder holding config.json"):
        fdm.FDM.from_pretrained(tmp_path / "model.yaml")
    with pytest.raises(FileNotFoundError, match="owner/repo is a Hub repo id, not a file"):
        resolve_file("owner/repo")
    with pytest.raises(HubError, match="an FDM is a whole Hub repo"):
        fdm.FDM.from_pretrained("hf://owner/repo/fdm")


ENTRY_POINTS = r"""
    import contextlib, io, json, logging, sys, time
    import fdm
    from fdm import cli
    from fdm.adapters.diffusers import load_model as load_diffusers
    from fdm.adapters.put import load_model as load_put
    from fdm.adapters.taming import load_model as load_taming
    from fdm.io.hub import resolve_file
    from taming_tiny import vqgan_config

    codec, images, image, mask, fdm_dir = sys.argv[1:6]
    cli.build_parser()  # the command modules imported once, before timing
    library = {
        "from_pretrained two slashes": lambda: fdm.FDM.from_pretrained("runs/phase2/fdm"),
        "from_pretrained dot": lambda: fdm.FDM.from_pretrained("./fdm-missing"),
        "from_pretrained existing parent": lambda: fdm.FDM.from_pretrained("a/b"),
        "resolve_file": lambda: resolve_file("logs/vqgan/configs/model.yaml"),
        "taming config": lambda: load_taming("logs/vqgan/configs/model.yaml", "logs/vqgan/checkpoints/last.ckpt"),
        "taming checkpoint": lambda: load_taming(vqgan_config(), "logs/vqgan/checkpoints/last.ckpt"),
        "put checkpoint": lambda: load_put("checkpoints/p_vqvae.pth"),
        "put transformer": lambda: load_put(codec, transformer="checkpoints/generator.pth"),
        "diffusers": lambda: load_diffusers("models/vq/missing"),
    }
    common = ["--out", "out", "--device", "cpu"]
    commands = {
        "--fdm": ["eval", images, "--fdm", "runs/phase2/fdm"],
        "--config": ["sample", "unconditional", "--config", "logs/vqgan/configs/model.yaml", "--checkpoint",
                     "logs/last.ckpt", "--no-fdm", *common],
        "--checkpoint": ["inpaint", "--image", image, "--mask", mask, "--checkpoint", "checkpoints/p_vqvae.pth",
                         *common],
        "--transformer": ["inpaint", "--image", image, "--mask", mask, "--checkpoint", codec, "--transformer",
                          "checkpoints/generator.pth", "--fdm", fdm_dir, *common],
        "--checkpoint diffusers": ["eval", images, "--model", "diffusers", "--checkpoint", "models/vq.safetensors",
                                   "--fdm", fdm_dir, "--device", "cpu"],
    }
    out = {"library": {}, "cli": {}}
    for name, call in library.items():
        start = time.perf_counter()
        try:
            call()
            out["library"][name] = None
        except Exception as err:
            out["library"][name] = [type(err).__name__, str(err), time.perf_counter() - start]
    root = logging.getLogger()
    for name, argv in commands.items():
        stderr = io.StringIO()
        root.handlers[:] = [logging.StreamHandler(stderr)]  # what main logs goes where the user sees it
        start = time.perf_counter()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(argv)
        out["cli"][name] = [code, stderr.getvalue(), time.perf_counter() - start]
    loaded = fdm.FDM.from_pretrained("tester/fdm-toy")  # a plausible owner/name goes to the Hub
    out["hub"] = [loaded.config["channels"], resolve_file("hf://tester/fdm-toy/config.json").name]
    print(json.dumps(out))
"""


def test_every_entry_point_fails_at_once_without_network(tmp_path, local_hub):
    module = fdm.FDM(channels=16, hidden_channels=16, num_blocks=1)
    module.save_pretrained(tmp_path / "fdm-toy")
    local_hub.repos["tester/fdm-toy"] = repo = Repo(private=False)
    repo.add_commit("main", {name: Blob((tmp_path / "fdm-toy" / name).read_bytes(), lfs=name.endswith(".safetensors"))
                             for name in ("config.json", "model.safetensors")}, "an FDM")
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (90, 120, 30)).save(tmp_path / "images" / "photo.png")
    Image.new("L", (32, 32), 0).save(tmp_path / "mask.png")
    args = [str(PUT_CODEC), "images", "images/photo.png", "mask.png", str(tmp_path / "fdm-toy")]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(ENTRY_POINTS), *args], cwd=tmp_path,
                            env=fdm_env(tmp_path, HF_ENDPOINT=local_hub.url, HF_HUB_OFFLINE="0"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    missing = {"from_pretrained two slashes": "runs/phase2/fdm", "from_pretrained dot": "./fdm-missing",
               "from_pretrained existing parent": "a/b", "resolve_file": "logs/vqgan/configs/model.yaml",
               "taming config": "logs/vqgan/configs/model.yaml", "taming checkpoint": "logs/vqgan/checkpoints/last.ckpt",
               "put checkpoint": "checkpoints/p_vqvae.pth", "put transformer": "checkpoints/generator.pth",
               "diffusers": "models/vq/missing"}
    for name, path in missing.items():
        kind, message, seconds = out["library"][name]
        assert (kind, message) == ("FileNotFoundError", f"file not found: {path}"), name
        assert seconds < 1.0, (name, seconds)
    commands = {"--fdm": ("eval", "runs/phase2/fdm"), "--config": ("sample unconditional", "logs/vqgan/configs/model.yaml"),
                "--checkpoint": ("inpaint", "checkpoints/p_vqvae.pth"),
                "--transformer": ("inpaint", "checkpoints/generator.pth"),
                "--checkpoint diffusers": ("eval", "models/vq.safetensors")}
    for name, (command, path) in commands.items():
        code, stderr, seconds = out["cli"][name]
        lines = stderr.splitlines()  # fdm eval logs its views before loading the model
        assert code == 2 and lines[-1] == f"fdm {command}: error: file not found: {path}", (name, stderr)
        assert sum("error" in line for line in lines) == 1 and "Traceback" not in stderr, (name, stderr)
        assert seconds < 1.0, (name, seconds)
    # not one request for a missing path; the Hub repo id did reach the (local) Hub
    assert out["hub"] == [16, "config.json"]
    assert local_hub.requests and all("tester/fdm-toy" in path for _, path in local_hub.requests), local_hub.requests
