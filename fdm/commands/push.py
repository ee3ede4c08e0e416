"""Upload a trained FDM folder to the Hugging Face Hub, after checking that it loads strictly as an FDM.

The folder (written by `fdm train`, `fdm finetune` or FDM.save_pretrained) is loaded first: a truncated or
corrupted weight file, or a config.json that does not match the weights, stops the command before anything is
uploaded. What is uploaded is exactly what FDM.save_pretrained writes (model.safetensors, config.json, the
README.md model card naming the repo, and decoder.safetensors for a phase-3 FDM): training checkpoints or
feature caches in the folder stay local. A hand-written README.md in the folder is uploaded as it is.
Authenticate with `hf auth login` or the HF_TOKEN environment variable; HF_ENDPOINT selects another Hub.

Examples:
  fdm push fdm-vqgan user/fdm-vqgan-ffhq
  fdm push runs/phase3/fdm user/fdm-put-places --private --revision v2 --commit-message "phase 3, 20k steps"
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi

from fdm.errors import CheckpointError
from fdm.io.hub import _hub_errors, _is_generated_model_card
from fdm.module import FDM

__all__ = ["add_arguments", "push", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="FDM folder written by fdm train / FDM.save_pretrained")
    parser.add_argument("repo_id", help="Hub repo id, namespace/name (created if it does not exist)")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", help="branch to push to, created from main if missing (default: main)")
    parser.add_argument("--commit-message", help="commit message (default: names the FDM's base model)")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`)")


def run(args: argparse.Namespace) -> int:
    commit = push(args.folder, args.repo_id, private=args.private, revision=args.revision,
                  commit_message=args.commit_message, token=args.token)
    logger.info("pushed %s to %s", args.folder, commit.commit_url)
    return 0


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Check that ``folder`` loads as an FDM, then upload it to ``repo_id`` in one commit.

    Args:
        folder: folder written by :meth:`fdm.FDM.save_pretrained`.
        repo_id: Hub repo ``namespace/name``; created (``private`` if asked) when it does not exist.
        revision: branch to commit to, created from ``main`` if missing; None = ``main``.
        commit_message: defaults to a message naming the base model.
        token: Hub token; None uses huggingface_hub's own lookup (``HF_TOKEN``, saved login).

    Returns:
        The commit (``commit_url``, ``oid``).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        CheckpointError: the folder does not load as an FDM (nothing is uploaded then).
        HubError: the Hub refused (no token or rights, offline mode...).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"FDM folder not found: {folder}")
    module = FDM.from_pretrained(folder)  # strict: every key and shape against config.json
    card = folder / "README.md"
    if card.is_symlink():  # its target's bytes, wherever they are, would be uploaded as the model card
        raise CheckpointError(f"{card} is a symbolic link; fdm push uploads a hand-written model card only when it "
                              "is a file of the folder itself.")
    api = HfApi(token=token)
    with _hub_errors(repo_id, revision=revision):  # not found, no rights, offline... -> HubError
        repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True).repo_id
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    message = commit_message or f"Upload FDM for {module.base_model or 'an unnamed base model'} (fdm-vq)"
    with tempfile.TemporaryDirectory(prefix="fdm-push-") as staging:
        module.save_pretrained(staging, model_card_kwargs={"repo_id": repo_id})
        if card.is_file() and not _is_generated_model_card(card):
            shutil.copyfile(card, Path(staging) / "README.md")
        with _hub_errors(repo_id, revision=revision):
            return api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision,
                                     commit_message=message)
