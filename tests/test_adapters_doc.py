"""docs/adapters.md works: its code blocks, extracted from the page, make a new model family in a temporary
folder; registered with the one documented call, it is found by fdm.find_adapter, wrapped by the Dequantizer and
driven by the ``fdm`` command line (``fdm train`` then ``fdm eval --model toyfam``). Also: the registry's
contract (abstract adapters, one declaration per built-in family); that ``import fdm`` imports no family is checked
in the fresh interpreter of tests/test_packaging.py."""

from __future__ import annotations

import inspect
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import fdm
from fdm import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"
BLOCK = re.compile(r"^```(?P<lang>\w+)(?P<info>[^\n]*)\n(?P<body>.*?)^```\s*$", re.S | re.M)


def _blocks() -> list[tuple[str, str, str]]:
    """(language, file name or '', body) of every fenced block of docs/adapters.md, in order."""
    out = []
    for match in BLOCK.finditer(DOC.read_text()):
        file = re.search(r"file=(\S+)", match["info"])
        out.append((match["lang"], file.group(1) if file else "", match["body"]))
    return out


@pytest.fixture()
def toyfam(tmp_path, monkeypatch):
    """The doc's family package written to tmp_path, importable, and the registry restored afterwards."""
    files = [(name, body) for lang, name, body in _blocks() if name]
    assert sorted(name for name, _ in files) == ["toyfam/__init__.py", "toyfam/adapter.py", "toyfam/model.py"]
    for name, body in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))
    yield tmp_path
    for name in [m for m in sys.modules if m == "toyfam" or m.startswith("toyfam.")]:
        del sys.modules[name]
    registry._loaded.pop("toyfam", None)


def test_the_doc_adapter_is_the_test_adapter():
    """The page shows the adapter of tests/toy_vq.py, verbatim."""
    from toy_vq import ToyVQ, ToyVQAdapter

    text = DOC.read_text()
    assert inspect.getsource(ToyVQAdapter) in text and inspect.getsource(ToyVQ) in text


def test_walk_through(toyfam, capsys):
    python = [body for lang, name, body in _blocks() if lang == "python" and not name]
    shell = [body for lang, _, body in _blocks() if lang == "bash"]
    namespace: dict = {}
    assert "register_family" in python[0]
    exec(compile(python[0], "docs/adapters.md (register)", "exec"), namespace)  # the one registry line
    assert registry.FAMILIES[-1] == "toyfam"
    exec(compile(python[1], "docs/adapters.md (use)", "exec"), namespace)
    assert "torch.Size([1, 3, 32, 32])" in capsys.readouterr().out
    assert registry.get_family("toyfam").adapters == (namespace["ToyVQAdapter"],)
    assert isinstance(namespace["deq"].adapter, namespace["ToyVQAdapter"])

    # the command line: the doc's commands, run in-process (the registration above is in this process)
    from fdm.cli import main
    from fdm.images import save_image

    photos = toyfam / "photos"
    photos.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        save_image(torch.rand(3, 40, 40, generator=generator) * 2 - 1, photos / f"p{i}.png")
    commands = [shlex.split(line) for block in shell for line in block.splitlines() if line.startswith("fdm ")]
    assert [c[1] for c in commands] == ["train", "eval"] and all("toyfam" in c for c in commands)
    for command in commands:
        capsys.readouterr()
        assert main(command[1:]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "toyfam" and report["views"] == 2
    trained = fdm.FDM.from_pretrained(toyfam / "fdm-toy")
    model = namespace["load_model"]("toy.safetensors")
    assert trained.base_model_fingerprint == fdm.find_adapter(model).fingerprint()


def test_two_families_cannot_share_a_name(tmp_path, monkeypatch):
    (tmp_path / "second_toy.py").write_text("from fdm.registry import ModelFamily\nfrom toy_vq import ToyVQAdapter\n"
                                            "FAMILY = ModelFamily(name='toy', adapters=(ToyVQAdapter,))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_vq  # noqa: F401  (registers the family called toy)

    with pytest.raises(fdm.errors.ConfigError, match=r"second_toy: its family is called 'toy', like the family of "
                                                     r"toy_vq"):
        registry.register_family("second_toy")
    assert "second_toy" not in registry.FAMILIES


def test_unregistered_model_names_the_registry():
    with pytest.raises(TypeError, match="register_family"):
        fdm.find_adapter(torch.nn.Linear(2, 2))


def test_adapter_missing_a_method_fails_at_construction():
    from toy_vq import ToyVQ, ToyVQAdapter

    class Incomplete(fdm.VQAdapter):  # no decode, hook_module, ...
        @classmethod
        def matches(cls, model):
            return False

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(ToyVQ())
    assert ToyVQAdapter(ToyVQ()).factor == 4


def test_built_in_families_declare_themselves_once():
    import fdm.adapters.diffusers
    import fdm.adapters.put
    import fdm.adapters.taming
    from fdm.cli import commands

    declared = {f.name: f for f in registry.families()}
    assert {"taming", "put", "diffusers"} <= set(declared)
    assert declared["taming"] is fdm.adapters.taming.FAMILY and declared["put"] is fdm.adapters.put.FAMILY
    assert declared["taming"].load_model is fdm.adapters.taming.load_model
    assert declared["put"].load_model is fdm.adapters.put.load_model
    assert declared["diffusers"].load_model is fdm.adapters.diffusers.load_model
    assert declared["taming"].commands == {"sample": "fdm.adapters.taming.command"}
    assert declared["put"].commands == {"inpaint": "fdm.adapters.put.command"}
    assert declared["diffusers"].extra == "diffusers" and declared["taming"].extra == "taming"
    assert {"demo", "taming", "put", "diffusers"} <= set(registry.cli_models())
    assert {"sample", "inpaint", "eval", "train"} <= set(commands())


def test_a_channel_mismatch_is_the_same_error_everywhere(tmp_path):
    from fdm.errors import FingerprintMismatchError
    from fdm.training import Phase2Config, Phase2Trainer, Phase3Config, Phase3Trainer
    from fdm.training.data import TensorViews
    from toy_vq import ToyVQ

    model, wrong = ToyVQ().eval(), fdm.FDM(16, hidden_channels=8, num_blocks=1)
    views = TensorViews(torch.rand(2, 3, 16, 16) * 2 - 1)
    with pytest.raises(FingerprintMismatchError, match="16-channel features .* 8 channels"):
        Phase2Trainer(model, views, Phase2Config(steps=1, output_dir=str(tmp_path / "p2")), fdm_module=wrong)
    with pytest.raises(FingerprintMismatchError, match="16-channel features .* 8 channels"):
        Phase3Trainer(model, wrong, views, Phase3Config(steps=1, output_dir=str(tmp_path / "p3"), drop_vgg_terms=True))
    with pytest.raises(FingerprintMismatchError, match="16-channel"):
        fdm.Dequantizer(model, wrong)
