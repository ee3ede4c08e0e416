"""An FDM folder holds its own files, each carrying what fdm-vq wrote (issue 23): weights without their digest are
refused (local folders and Hub repos), and no file is a symbolic link leading out of the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fdm
from fdm.errors import CheckpointError
from fdm.io.weights import DIGEST_KEY, state_dict_digest

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent


def _saved(folder: Path, *, decoder: bool = False, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    module = fdm.FDM(8, hidden_channels=8, num_blocks=1)
    if decoder:
        module.finetuned_decoder = True
        module.decoder_state = {"conv.weight": torch.randn(3, 8, 3, 3)}
    module.save_pretrained(folder)
    return folder


def _weights_without_digest(folder: Path) -> None:
    state = fdm.FDM.from_pretrained(folder).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))  # safetensors' own


def test_weights_without_their_digest_are_refused(tmp_path):
    folder = _saved(tmp_path / "fdm")
    _weights_without_digest(folder)
    with pytest.raises(CheckpointError, match=rf"model.safetensors carries no {DIGEST_KEY} digest"):
        fdm.FDM.from_pretrained(folder)


def test_the_demo_fdm_and_converted_official_weights_still_load(tmp_path):
    """The embedded demo FDM carries its digest; an official checkpoint converted and saved gains one."""
    from fdm.demo.model import DEMO_FDM_DIR
    from fdm.io.official import fdm_to_official_state_dict

    fdm.FDM.from_pretrained(DEMO_FDM_DIR)
    original = fdm.FDM(8, hidden_channels=8, num_blocks=8)
    torch.save({"model": fdm_to_official_state_dict(original.state_dict())}, tmp_path / "official.pth")
    converted = fdm.FDM.from_official_checkpoint(tmp_path / "official.pth")
    converted.save_pretrained(tmp_path / "converted")
    loaded = fdm.FDM.from_pretrained(tmp_path / "converted")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "decoder.safetensors"])
def test_a_file_linked_to_another_models_folder_is_refused(tmp_path, name):
    """The weights (or config, or fine-tuned decoder) of one folder linked to another model's: never loaded."""
    mine, other = _saved(tmp_path / "mine", decoder=True), _saved(tmp_path / "other", decoder=True, seed=1)
    (mine / name).unlink()
    (mine / name).symlink_to(other / name)
    with pytest.raises(CheckpointError, match=rf"{name} is a symbolic link to .*other/{name}, outside .*mine"):
        fdm.FDM.from_pretrained(mine)


def test_links_inside_the_folder_and_a_linked_folder_still_load(tmp_path):
    folder = _saved(tmp_path / "fdm")
    (folder / "versions").mkdir()
    (folder / "model.safetensors").rename(folder / "versions" / "v1.safetensors")
    (folder / "model.safetensors").symlink_to(Path("versions") / "v1.safetensors")
    (tmp_path / "link").symlink_to(folder)  # the folder itself reached through a link
    for path in (folder, tmp_path / "link"):
        fdm.FDM.from_pretrained(path)


def test_a_hub_snapshot_folder_linking_to_its_blobs_loads(tmp_path):
    """huggingface_hub's cache layout: snapshots/<revision>/<file> -> ../../blobs/<hash>."""
    source = _saved(tmp_path / "fdm")
    repo = tmp_path / "hub" / "models--tester--fdm"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(source.iterdir())):
        (blobs / f"blob{i}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    fdm.FDM.from_pretrained(snapshot)


@pytest.mark.slow  # a fresh interpreter (huggingface_hub reads HF_ENDPOINT when it is imported)
def test_hub_weights_without_their_digest_are_refused(tmp_path, local_hub):
    from hub_server import Blob, Repo
    from test_hub import client_env, run_client

    folder = _saved(tmp_path / "fdm")
    state = {k: v.contiguous() for k, v in fdm.FDM.from_pretrained(folder).state_dict().items()}
    save_file(state, str(tmp_path / "no-digest.safetensors"))
    save_file(state, str(tmp_path / "digest.safetensors"), metadata={DIGEST_KEY: state_dict_digest(state)})
    for name, weights in [("no-digest", "no-digest.safetensors"), ("digest", "digest.safetensors")]:
        repo = Repo(private=False)
        repo.add_commit("main", {"config.json": Blob((folder / "config.json").read_bytes(), lfs=False),
                                 "model.safetensors": Blob((tmp_path / weights).read_bytes(), lfs=True)}, "upload")
        local_hub.repos[f"tester/{name}"] = repo
    code = """
        import json, fdm
        out = {}
        for repo in ("tester/digest", "tester/no-digest"):
            try:
                fdm.FDM.from_pretrained(repo)
                out[repo] = "loaded"
            except fdm.CheckpointError as err:
                out[repo] = str(err)
        print(json.dumps(out))
    """
    out = run_client(code, client_env(local_hub.url, tmp_path, PYTHONPATH=f"{REPO_ROOT}:{TESTS}"))
    assert out["tester/digest"] == "loaded"
    assert f"carries no {DIGEST_KEY} digest" in out["tester/no-digest"]


def test_config_json_linked_out_is_refused_before_it_is_read(tmp_path):
    folder = _saved(tmp_path / "fdm")
    secret = tmp_path / "elsewhere.json"
    secret.write_text(json.dumps({"channels": 8}))
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="config.json is a symbolic link"):
        fdm.FDM.from_pretrained(folder)
