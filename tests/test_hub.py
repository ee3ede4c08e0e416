"""FDM on the Hugging Face Hub: the save_pretrained layout and model card, and round trips through the real
huggingface_hub client (push_to_hub, from_pretrained, hf_hub_download, snapshot_download, offline cache mode,
`fdm push`) against the local Hub stand-in of tests/hub_server.py (127.0.0.1, no internet).

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE when it is imported, so every client runs in a subprocess
with its own environment and an isolated HF_HOME cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import TOKEN
from huggingface_hub import ModelCard
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_model

import fdm
from fdm.cli import COMMANDS
from fdm.io.decoder_weights import decoder_state_dict
from fdm.io.hub import MODEL_CARD_MARKER
from fdm.io.weights import state_dict_digest
from toy_vq import ToyVQ

TESTS = Path(__file__).resolve().parent
REPO = "tester/fdm-toy"


def trained_fdm(**config) -> fdm.FDM:
    """A small FDM with non-zero weights (a fresh one is an identity, which would hide a weight mix-up)."""
    module = fdm.FDM(channels=8, hidden_channels=16, num_blocks=2, **config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)
    return module.eval()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def client_env(endpoint: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of a huggingface_hub client that talks only to ``endpoint`` and caches under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("HF_", "HUGGINGFACE_")) and k.lower() not in ("http_proxy", "https_proxy",
                                                                                      "all_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    env.update(extra)
    return env


def run_client(code: str, env: dict[str, str], *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line, which is returned."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, f"client failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the save_pretrained layout -----------------------------------------------------------------------------


def test_save_pretrained_writes_the_current_config(tmp_path):
    module = trained_fdm()
    module.base_model = "tester/toy-vq"  # set after construction, as the trainers do
    module.base_model_fingerprint = fdm.codebook_fingerprint(ToyVQ().codebook.weight)
    module.training_info = {"phase": 2, "steps": 12, "data": "photos", "hole_ratio": [0.2, 0.6]}
    module.save_pretrained(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == module.config
    loaded = fdm.FDM.from_pretrained(tmp_path)
    assert loaded.config == module.config
    assert state_dict_digest(loaded.state_dict()) == state_dict_digest(module.state_dict())
    assert not loaded.training  # eval mode


def test_save_pretrained_refuses_a_config_that_differs_from_the_module(tmp_path):
    module = trained_fdm()
    module.save_pretrained(tmp_path / "same", config=module.config)  # what phase-2 training passes
    with pytest.raises(ValueError, match="derived from the module"):
        module.save_pretrained(tmp_path / "other", config={**module.config, "channels": 4})


@pytest.mark.parametrize("phase", [2, 3])
def test_model_card_names_base_model_training_and_decoder(tmp_path, phase):
    toy = ToyVQ()
    fingerprint = fdm.codebook_fingerprint(toy.codebook.weight)
    if phase == 2:
        module = trained_fdm(base_model="tester/toy-vq", base_model_fingerprint=fingerprint,
                             training={"phase": 2, "steps": 12, "data": "photos", "hole_ratio": [0.2, 0.6],
                                       "heldout": {"images": 3, "setting": "oracle inpainting", "step": 8,
                                                   "feature_ratio": 0.91, "psnr_gain": 0.12}})
    else:
        module = trained_fdm(mask_channels=0, base_model="toy.ckpt", base_model_fingerprint=fingerprint,
                             finetuned_decoder=True,
                             training={"phase": 2, "steps": 12, "data": "photos", "phase3": {"steps": 5}})
        module.decoder_state = decoder_state_dict(fdm.find_adapter(toy))
    module.save_pretrained(tmp_path)

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "fdm-vq"
    assert card.data.license == "mit"
    assert {"fdm", "vector-quantization", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    # the Hub accepts only repo ids as base_model metadata: a file name stays in the text only
    assert card.data.get("base_model") == ("tester/toy-vq" if phase == 2 else None)
    text = card.text
    assert MODEL_CARD_MARKER in text
    assert f"`{module.base_model}`" in text and f"`{fingerprint}`" in text
    assert f"| {sum(p.numel() for p in module.parameters()):,} |" in text
    assert "| Optimizer steps | 12 |" in text and "| Training data | photos |" in text
    assert "arxiv.org/abs/2412.01046" in text and "Park, Kyungri and Jung, Woohwan" in text
    assert "fdm.Dequantizer(model, fdm.FDM.from_pretrained(" in text
    if phase == 2:
        assert "| Hole ratio of the random masks | 0.2 - 0.6 |" in text
        assert ("On 3 images held out of its training data (oracle inpainting), this FDM beats plain VQ: feature "
                "error ratio ||z - z_dq|| / ||z - z_q|| 0.91, PSNR gain 0.12 dB.") in text
        assert "| Held-out PSNR gain (dB) | 0.12 |" in text
        assert "dequantizer.reconstruct(x, mask)" in text and "decoder.safetensors" not in text
    else:
        assert "| phase3.steps | 5 |" in text and "## Fine-tuned decoder" in text
        assert "dequantizer.decode_indices(indices)" in text and "Mask-free" in text
        loaded = fdm.FDM.from_pretrained(tmp_path)
        assert loaded.finetuned_decoder and loaded.decoder_state.keys() == module.decoder_state.keys()


def test_model_card_is_regenerated_but_a_hand_written_one_is_kept(tmp_path):
    module = trained_fdm(base_model="tester/toy-vq")
    module.save_pretrained(tmp_path)
    module.base_model_fingerprint = "n16-c8-0123456789abcdef"
    module.training_info = {"phase": 2, "steps": 99}
    module.save_pretrained(tmp_path)  # the mixin alone would keep the stale card
    text = (tmp_path / "README.md").read_text()
    assert "`n16-c8-0123456789abcdef`" in text and "| Optimizer steps | 99 |" in text
    assert "not recorded" not in text

    hand_written = "---\nlicense: mit\nlibrary_name: fdm-vq\n---\n# My FDM\n\nNotes I wrote myself.\n"
    (tmp_path / "README.md").write_text(hand_written)
    module.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == hand_written


def test_from_pretrained_honours_map_location_and_refuses_plain_mixin_files(tmp_path):
    module = trained_fdm()
    module.save_pretrained(tmp_path)
    on_meta = fdm.FDM.from_pretrained(tmp_path, map_location="meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    # a model.safetensors written without fdm-vq's digest (e.g. by the plain mixin) is refused: nothing vouches for it
    save_model(module, str(tmp_path / "model.safetensors"))
    with pytest.raises(fdm.errors.CheckpointError, match="model.safetensors carries no fdm_vq.sha256 digest"):
        fdm.FDM.from_pretrained(tmp_path)


def test_from_pretrained_refuses_non_strict_loading_and_missing_folders(tmp_path):
    trained_fdm().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="strict=False is not supported"):
        fdm.FDM.from_pretrained(tmp_path, strict=False)
    with pytest.raises(FileNotFoundError, match="^file not found: .*does/not/exist$"):
        fdm.FDM.from_pretrained(tmp_path / "does" / "not" / "exist")


def test_fdm_push_is_a_registered_command():
    assert COMMANDS["push"] == "fdm.commands.push"


# --- round trips through the real client and the local Hub ----------------------------------------------------

PUSH_AND_DOWNLOAD = """
    import hashlib, json, pathlib, sys
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    import fdm
    from fdm.io.weights import state_dict_digest

    module = fdm.FDM.from_pretrained(sys.argv[1])
    commit_url = module.push_to_hub("tester/fdm-toy", commit_message="first upload")
    loaded = fdm.FDM.from_pretrained("tester/fdm-toy")
    config_file = pathlib.Path(hf_hub_download("tester/fdm-toy", "config.json"))
    snapshot = pathlib.Path(snapshot_download("tester/fdm-toy"))
    print(json.dumps({
        "endpoint": constants.ENDPOINT,
        "commit_url": commit_url,
        "digest": state_dict_digest(loaded.state_dict()),
        "config": loaded.config,
        "eval": not loaded.training,
        "config_file": json.loads(config_file.read_text()),
        "config_file_in_cache": str(config_file).startswith(constants.HF_HUB_CACHE),
        "snapshot": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in snapshot.iterdir()},
    }))
"""

LOAD_OFFLINE = """
    import json
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    import fdm
    from fdm.io.weights import state_dict_digest
    from fdm.errors import HubError

    loaded = fdm.FDM.from_pretrained("tester/fdm-toy")
    try:
        fdm.FDM.from_pretrained("tester/never-downloaded")
        missing = "loaded"
    except HubError as err:  # huggingface_hub's LocalEntryNotFoundError, converted by fdm.io.hub.convert_hub_error
        offline = "offline mode is on" in str(err) and "tester/never-downloaded" in str(err)
        missing = type(err.__cause__).__name__ if offline else str(err)
    print(json.dumps({"offline": constants.HF_HUB_OFFLINE, "digest": state_dict_digest(loaded.state_dict()),
                      "config": loaded.config, "missing": missing}))
"""


def test_push_to_hub_then_download_then_offline(local_hub, tmp_path):
    module = trained_fdm(base_model="tester/toy-vq", base_model_fingerprint="n16-c8-0123456789abcdef",
                         training={"phase": 2, "steps": 12})
    module.save_pretrained(tmp_path / "src")
    endpoint = local_hub.url
    out = run_client(PUSH_AND_DOWNLOAD, client_env(endpoint, tmp_path), str(tmp_path / "src"))

    # the client used the local Hub, and the LFS upload path for the weights (Xet disabled)
    assert out["endpoint"] == local_hub.url
    assert out["commit_url"].startswith(f"{local_hub.url}/{REPO}/commit/")
    calls = set(local_hub.requests)
    assert {("POST", "/api/repos/create"), ("POST", f"/api/models/{REPO}/preupload/main"),
            ("POST", f"/{REPO}.git/info/lfs/objects/batch"), ("POST", f"/{REPO}.git/info/lfs/objects/verify"),
            ("POST", f"/api/models/{REPO}/commit/main"), ("HEAD", f"/{REPO}/resolve/main/model.safetensors"),
            ("GET", f"/{REPO}/resolve/main/model.safetensors")} <= calls
    assert any(method == "PUT" and path.startswith("/lfs-upload/") for method, path in calls)
    assert any(path.startswith(f"/api/models/{REPO}/tree/") for _, path in calls)  # snapshot_download's listing

    # what the Hub holds: the save_pretrained files, the same weights, a card naming the repo
    remote = local_hub.files(REPO)
    assert sorted(remote) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert local_hub.repos[REPO].commits[local_hub.repos[REPO].branches["main"]]["model.safetensors"].lfs
    assert state_dict_digest(safetensors_load(remote["model.safetensors"])) == state_dict_digest(module.state_dict())
    card = remote["README.md"].decode()
    assert f'fdm.FDM.from_pretrained("{REPO}")' in card and "`tester/toy-vq`" in card

    # what the client got back: identical weights and config, the files through both download functions
    assert out["digest"] == state_dict_digest(module.state_dict())
    assert out["config"] == out["config_file"] == module.config
    assert out["eval"] and out["config_file_in_cache"]
    assert out["snapshot"] == {name: sha256(data) for name, data in remote.items()}

    # offline cache mode: with the Hub stopped, a new process loads from the cache. A bare socket now listens on
    # the Hub's port, so any connection attempt would be seen (without it a refused connection would also fall
    # back to the cache, and offline mode would go untested).
    local_hub.stop()
    with socket.create_server(("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))) as listener:
        listener.setblocking(False)
        offline = run_client(LOAD_OFFLINE, client_env(endpoint, tmp_path, HF_HUB_OFFLINE="1"))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert offline == {"offline": True, "digest": out["digest"], "config": module.config,
                       "missing": "LocalEntryNotFoundError"}


FDM_PUSH = """
    import argparse, json, sys
    import fdm
    from fdm.commands import push
    from fdm.errors import CheckpointError
    from fdm.io.weights import state_dict_digest

    parser = argparse.ArgumentParser()
    push.add_arguments(parser)
    good, broken = sys.argv[1], sys.argv[2]
    rc = push.run(parser.parse_args([good, "tester/fdm-cli", "--private", "--revision", "dev",
                                     "--commit-message", "phase 2, toy"]))
    try:
        push.run(parser.parse_args([broken, "tester/fdm-broken"]))
        error = None
    except CheckpointError as err:
        error = str(err)
    loaded = fdm.FDM.from_pretrained("tester/fdm-cli", revision="dev")
    print(json.dumps({"rc": rc, "error": error, "digest": state_dict_digest(loaded.state_dict())}))
"""


def test_fdm_push_validates_then_uploads_the_fdm_files(local_hub, tmp_path):
    module = trained_fdm(base_model="tester/toy-vq")
    good, broken = tmp_path / "good", tmp_path / "broken"
    module.save_pretrained(good)
    hand_written = "---\nlicense: mit\nlibrary_name: fdm-vq\n---\n# FDM for the toy VQ\n\nWritten by hand.\n"
    (good / "README.md").write_text(hand_written)
    (good / "checkpoints").mkdir()
    (good / "checkpoints" / "step-12.pt").write_bytes(b"training state that must stay local")
    module.save_pretrained(broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_blocks": 3}))  # weights have 2 blocks

    out = run_client(FDM_PUSH, client_env(local_hub.url, tmp_path), str(good), str(broken))

    assert out["rc"] == 0
    repo = local_hub.repos["tester/fdm-cli"]
    assert repo.private
    assert sorted(local_hub.files("tester/fdm-cli", "main")) == [".gitattributes"]
    dev = local_hub.files("tester/fdm-cli", "dev")
    assert sorted(dev) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert dev["README.md"].decode() == hand_written
    assert json.loads(dev["config.json"]) == module.config
    assert repo.messages[repo.branches["dev"]] == "phase 2, toy"
    assert out["digest"] == state_dict_digest(module.state_dict())
    # the broken folder was refused before any request concerning it
    assert "blocks.2" in out["error"] and "does not match its weights" in out["error"]
    assert "tester/fdm-broken" not in local_hub.repos
    assert not any("fdm-broken" in path for _, path in local_hub.requests)


def test_fdm_push_refuses_a_model_card_that_is_a_symbolic_link(tmp_path):
    from fdm.commands.push import push

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    trained_fdm().save_pretrained(tmp_path / "fdm")
    (tmp_path / "fdm" / "README.md").unlink()
    (tmp_path / "fdm" / "README.md").symlink_to(secret)
    with pytest.raises(fdm.errors.CheckpointError, match="README.md is a symbolic link"):  # before any request
        push(tmp_path / "fdm", "tester/fdm-symlink")


def test_model_card_takes_no_markdown_from_a_crafted_training_record(tmp_path):
    crafted = {"phase": 2, "data": "a\n# Injected heading <script>x</script> `code`",
               "heldout": {"images": 3, "setting": "reconstruction\n\n# Injected", "feature_ratio": 0.5,
                           "psnr_gain": 1.0}}
    module = trained_fdm(training=crafted)
    module.save_pretrained(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text
    assert "\n# Injected" not in text and "<script>" not in text and "this FDM beats" not in text
    assert "| Training data | a # Injected heading &lt;script&gt;x&lt;/script&gt; \\`code\\` |" in text
