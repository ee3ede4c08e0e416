"""Documentation that runs: every shell command and Python block of README.md and docs/*.md is executed.

A fenced block in ``python``, ``bash``, ``sh`` or ``shell`` runs; every other fence must name its language
(``text`` for output, ``bibtex``, ``yaml``, ...), so that no command hides in an untagged fence, and shell
commands are never 4-space indented blocks. A block that cannot run here carries, on the line right before
its fence, the only marker this test honours::

    <!-- docs-test: skip (reason) -->

e.g. ``(runs pip install)``, ``(needs a GPU)``, ``(uploads to the Hugging Face Hub)``. The reason is shown in
pytest's skip summary (``-ra``).

The blocks of one document run in order, as a reader would type them: the Python blocks in-process in one
namespace, the shell blocks through ``bash -e`` with this interpreter's environment first on ``PATH``, all with
the same fresh working directory, offline (``HF_HUB_OFFLINE=1``) and with a private ``HF_HOME``. Where a
document names a user's own model or data, the test runs it against the embedded demo model through the
explicit tables below, which are the whole difference between what the docs say and what runs:

- ``PRELUDES``: Python run in a document's namespace before its first Python block (the objects its prose
  assumes: ``vqgan``, ``x``, ``mask``);
- ``FILES``: files (or copies of folders) created in a document's working directory before its first block;
- ``SUBSTITUTIONS``: text replaced in a document's blocks before they run (a user's paths and repo ids -> the
  demo model's files, training lengths -> a few steps). Every entry must still match (test below).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ASSETS = ROOT / "fdm" / "demo" / "assets"

RUN_LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
SKIP_MARKER = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.S | re.M)
SHELL_TIMEOUT_S = 300

# The demo model stands in for "your model": its taming config and weights, its FDM, its sample photos.
DEMO_CONFIG = str(ASSETS / "vqgan.yaml")
DEMO_WEIGHTS = str(ASSETS / "vqgan.safetensors")
DEMO_FDM = str(ASSETS / "fdm")
PHOTO = str(ASSETS / "chelsea.png")
IMAGES = "images"  # a folder of the three sample photos, created in every document's working directory
SHORT_RUN = "--steps 2 --batch-size 2 --crop-size 64 --views-per-image 1"

_DEMO_OBJECTS = f"""
import torch
from fdm.demo.model import load_demo_fdm, load_demo_vqgan
from fdm.images import read_image
vqgan = load_demo_vqgan()
x = read_image({PHOTO!r})
mask = torch.zeros(1, 1, *x.shape[-2:]); mask[..., 32:96, 64:128] = 1
"""

PRELUDES = {
    "docs/training.md": _DEMO_OBJECTS,
    "docs/finetuning.md": _DEMO_OBJECTS,
    "docs/hub.md": _DEMO_OBJECTS,
}

FILES = {  # name -> text content, or a folder to copy
    "docs/finetuning.md": {"fdm-vqgan": ASSETS / "fdm"},  # the phase-2 FDM the page starts from
    "docs/hub.md": {"my_script.py": 'import fdm\nprint(fdm.FDM.from_pretrained("fdm-vqgan-ffhq").config)\n'},
}

SUBSTITUTIONS = {
    "docs/getting-started.md": [
        ("logs/vqgan/configs/model.yaml", DEMO_CONFIG),
        ("logs/vqgan/checkpoints/last.ckpt", DEMO_WEIGHTS),
        ('"your-name/fdm-vqgan"', repr(DEMO_FDM)),
        ('"photo.png"', repr(PHOTO)),
        ("--config model.yaml --checkpoint last.ckpt", f"--config {DEMO_CONFIG} --checkpoint {DEMO_WEIGHTS}"),
        ("--data images/", f"--data {IMAGES}"),
        ("--minutes 4", SHORT_RUN),
        ('"your-name/fdm-mine"', '"fdm-mine"'),  # the folder `fdm train` wrote above; `fdm push` is skipped
        ("fdm eval path/to/images", f"fdm eval {IMAGES} --no-extras --crop-size 64 --views-per-image 1"),
    ],
    "docs/training.md": [
        ("--config vqgan-project.yaml --checkpoint vqgan.ckpt", f"--config {DEMO_CONFIG} --checkpoint {DEMO_WEIGHTS}"),
        ("--data photos/train", f"--data {IMAGES}"),
        ("--epochs 50 --batch-size 16", SHORT_RUN),
        ("--minutes 4", "--minutes 0.2 --batch-size 2 --crop-size 64 --views-per-image 1"),  # the time-budget path
        ('"photos/train", crop_size=256', f'"{IMAGES}", crop_size=64'),
        ("epochs=50, batch_size=16", "steps=2, batch_size=2"),
    ],
    "docs/finetuning.md": [
        ("--config vqgan-project.yaml --checkpoint vqgan.ckpt", f"--config {DEMO_CONFIG} --checkpoint {DEMO_WEIGHTS}"),
        ("--data photos/train --val-data photos/val", f"--data {IMAGES} --val-data {IMAGES}"),
        ("--steps 20000", SHORT_RUN),
        # torchvision's VGG19 weights are a 548 MB download; the shift-tolerant VGG16 ships with stlpips_pytorch
        ("--vgg-weights ~/.cache/torch/hub/checkpoints/vgg19-dcbac81d.pth", "--backbone st-vgg16"),
        ('vgg_weights="vgg19-dcbac81d.pth"', 'backbone="st-vgg16"'),
        ('"photos/train", crop_size=256', f'"{IMAGES}", crop_size=64'),
        ('"photos/val", crop_size=256', f'"{IMAGES}", crop_size=64'),
        ("steps=20000, batch_size=8", "steps=2, batch_size=2"),
    ],
    "docs/hub.md": [
        # the FDM saved by the first block is for 256 channels; the fingerprint check needs one made for vqgan
        ("fdm.Dequantizer(vqgan, module)", "fdm.Dequantizer(vqgan, load_demo_fdm())"),
        ("fdm.Dequantizer(vqgan, module, check_fingerprint=False)",
         "fdm.Dequantizer(vqgan, load_demo_fdm(), check_fingerprint=False)"),
    ],
    "docs/quality.md": [
        # FID and ST-LPIPS on CPU take minutes; tests/test_eval.py covers them; smaller and fewer crops, same path
        ("fdm eval ../shared/data/photos/val --crop-size 128 --views-per-image 4",
         f"fdm eval {IMAGES} --no-extras --crop-size 64 --views-per-image 1"),
        ("fdm eval data/eval-photos --json",
         f"fdm eval {ROOT / 'data' / 'eval-photos'} --no-extras --crop-size 64 --views-per-image 1 --json"),
    ],
}


@dataclass
class Block:
    doc: str  # path relative to the repository root
    line: int  # line of the opening fence
    kind: str  # "python" or "shell"
    code: str
    skip: str | None  # the marker's reason

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _fences(text: str):
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        yield match.group("lang").lower(), match.group("body"), line, before


def _blocks() -> list[Block]:
    blocks = []
    for path in DOCS:
        for lang, body, line, before in _fences(path.read_text()):
            if lang in RUN_LANGUAGES:
                marker = SKIP_MARKER.match(before)
                blocks.append(Block(_relative(path), line, RUN_LANGUAGES[lang], body,
                                    marker.group("reason") if marker else None))
    return blocks


BLOCKS = _blocks()


def _substituted(block: Block) -> str:
    code = block.code
    for old, new in SUBSTITUTIONS.get(block.doc, []):
        code = code.replace(old, new)
    return code


class _Workspace:
    """One document's working directory and Python namespace, shared by its blocks in order."""

    def __init__(self, doc: str, directory: Path):
        self.doc, self.directory = doc, directory
        self.namespace: dict = {"__name__": "__docs__"}
        self.prelude_done = False
        (directory / IMAGES).mkdir()
        for photo in ("chelsea.png", "coffee.png", "astronaut.png"):
            shutil.copy(ASSETS / photo, directory / IMAGES / photo)
        for name, content in FILES.get(doc, {}).items():
            if isinstance(content, Path):
                shutil.copytree(content, directory / name)
            else:
                (directory / name).write_text(content)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(directory / ".hf-home"),
                        HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH="",
                        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    made: dict[str, _Workspace] = {}

    def get(doc: str) -> _Workspace:
        if doc not in made:
            made[doc] = _Workspace(doc, tmp_path_factory.mktemp(Path(doc).stem))
        return made[doc]

    return get


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_doc_block_runs(block: Block, workspaces, monkeypatch):
    if block.skip:
        pytest.skip(f"{block.id}: {block.skip}")
    workspace = workspaces(block.doc)
    code = _substituted(block)
    if block.kind == "shell":
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=workspace.directory,
                                env=workspace.env, capture_output=True, text=True, timeout=SHELL_TIMEOUT_S)
        assert result.returncode == 0, (
            f"{block.id} exited with {result.returncode}:\n{code}\n--- stdout\n{result.stdout[-3000:]}"
            f"\n--- stderr\n{result.stderr[-3000:]}")
        return
    monkeypatch.chdir(workspace.directory)
    if not workspace.prelude_done:
        exec(compile(PRELUDES.get(block.doc, ""), f"{block.doc} prelude", "exec"), workspace.namespace)
        workspace.prelude_done = True
    exec(compile("\n" * (block.line) + code, block.doc, "exec"), workspace.namespace)


def test_every_substitution_matches_its_document():
    texts = {}
    for doc, pairs in SUBSTITUTIONS.items():
        blocks = "".join(b.code for b in BLOCKS if b.doc == doc and not b.skip)
        texts[doc] = [old for old, _ in pairs if old not in blocks]
    assert not any(texts.values()), f"substitutions that no longer match a runnable block: {texts}"
    assert set(PRELUDES) | set(FILES) <= {b.doc for b in BLOCKS}


def test_skip_markers_sit_right_before_a_runnable_fence():
    """A marker that does not precede a python/shell fence is honoured nowhere: it must not exist."""
    bad = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if "docs-test" in line:
                following = lines[number + 1] if number + 1 < len(lines) else ""
                language = (following[3:].split() or [""])[0].lower() if following.startswith("```") else None
                if not SKIP_MARKER.match(line) or language not in RUN_LANGUAGES:
                    bad.append(f"{_relative(path)}:{number + 1}: {line.strip()}")
    assert not bad, "misplaced or malformed docs-test markers:\n" + "\n".join(bad)


def test_every_fence_names_its_language():
    untagged = [f"{_relative(path)}:{line}" for path in DOCS for lang, _, line, _ in _fences(path.read_text())
                if not lang]
    assert not untagged, f"fences without a language (use text for output): {untagged}"


COMMAND_WORDS = ("fdm ", "python ", "python3 ", "pip ", "torchrun ", "accelerate ", "HF_")


def test_commands_are_in_fences_not_indented_blocks():
    """4-space indented code is not executed: commands belong in a ```bash fence (with a skip marker if need be)."""
    found = []
    for path in DOCS:
        text = FENCE.sub("", path.read_text())
        for match in re.finditer(r"(?:^|\n\n)((?: {4}.*\n?)+)", text):
            first = match.group(1).lstrip()
            if first.startswith(COMMAND_WORDS):
                found.append(f"{_relative(path)}: {first.splitlines()[0]}")
    assert not found, "indented commands (put them in a ```bash fence):\n" + "\n".join(found)


# The README's own contract with CI (formerly tests/test_readme.py).
README = (ROOT / "README.md").read_text()


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return next(line for line in lines if "pytest" in line and not line.startswith("#"))


@pytest.mark.skipif(not (ROOT / ".ci" / "run").is_file(), reason="no .ci/run (an sdist)")
def test_readme_shows_the_ci_test_command():
    """CI runs exactly the test command of the README's opening block."""
    first_block = FENCE.search(README).group("body")
    assert _ci_test_command() in first_block


def test_readme_opens_with_the_demo_command():
    first_block = FENCE.search(README).group("body")
    assert "fdm demo" in first_block
