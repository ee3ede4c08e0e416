"""docs/adapters.md works: its code blocks, extracted from the page, make a new model family package in a
temporary folder; registered with the one documented call, it is found by fdm.find_adapter, wrapped by the
Dequantizer and driven by the ``fdm`` command line (``fdm train`` then ``fdm eval --model toyfam``); installed
with pip, its entry point alone brings it, and its own option, to the ``fdm`` command. Also: the registry's
contract (abstract adapters, one declaration per built-in family, one family per name, one family per option);
that ``import fdm`` imports no family is checked in the fresh interpreter of tests/test_packaging.py."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fdm
from fdm import registry
from fdm.images import save_image

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"
BLOCK = re.compile(r"^```(?P<lang>\w+)(?P<info>[^\n]*)\n(?P<body>.*?)^```\s*$", re.S | re.M)


def _blocks() -> list[tuple[str, str, str]]:
    """(language, file name or '', body) of every fenced block of docs/adapters.md, in order."""
    out = []
    for match in BLOCK.finditer(DOC.read_text()):
        file = re.search(r"file=(\S+)", match["info"])
        out.append((match["lang"], file.group(1) if file else "", match["body"]))
    return out


def _write_package(folder: Path) -> None:
    """The doc's example package (pyproject.toml and toyfam/) written to ``folder``."""
    files = [(name, body) for lang, name, body in _blocks() if name]
    assert sorted(name for name, _ in files) == ["pyproject.toml", "toyfam/__init__.py", "toyfam/adapter.py",
                                                 "toyfam/model.py"]
    for name, body in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(body)


def _doc_commands() -> list[list[str]]:
    """The doc's ``fdm train`` / ``fdm eval`` command lines (the shell block after the pip one)."""
    return [shlex.split(line) for lang, _, body in _blocks() if lang == "bash" and "pip install" not in body
            for line in body.splitlines() if line.startswith("fdm ")]


def _photos(folder: Path) -> None:
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        save_image(torch.rand(3, 40, 40, generator=generator) * 2 - 1, folder / f"p{i}.png")


@pytest.fixture()
def registry_restored(monkeypatch):
    """The registry as it was, and the installed families read again, after the test."""
    monkeypatch.setattr(registry, "FAMILIES", list(registry.FAMILIES))
    loaded = dict(registry._loaded)
    registry._installed.cache_clear()
    yield
    registry._installed.cache_clear()
    registry._loaded.clear()
    registry._loaded.update(loaded)


@pytest.fixture()
def toyfam(tmp_path, monkeypatch, registry_restored):
    """The doc's family package written to tmp_path, importable, and the registry restored afterwards."""
    _write_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m == "toyfam" or m.startswith("toyfam.")]:
        del sys.modules[name]


def test_the_doc_adapter_is_the_test_adapter():
    """The page shows the adapter of tests/toy_vq.py, verbatim."""
    from toy_vq import ToyVQ, ToyVQAdapter

    text = DOC.read_text()
    assert inspect.getsource(ToyVQAdapter) in text and inspect.getsource(ToyVQ) in text


def test_walk_through(toyfam, capsys):
    python = [body for lang, name, body in _blocks() if lang == "python" and not name]
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

    _photos(toyfam / "photos")
    commands = _doc_commands()
    assert [c[1] for c in commands] == ["train", "eval"] and all("toyfam" in c for c in commands)
    assert "--toy-config" in commands[1]  # the family's own option
    for command in commands:
        capsys.readouterr()
        assert main(command[1:]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "toyfam" and report["views"] == 2
    trained = fdm.FDM.from_pretrained(toyfam / "fdm-toy")
    model = namespace["load_model"]("toy.safetensors")
    assert trained.base_model_fingerprint == fdm.find_adapter(model).fingerprint()


@pytest.mark.slow
def test_an_installed_package_brings_its_family_to_the_fdm_command(tmp_path):
    """pip installs the doc's package (its pyproject.toml, entry point included); in a fresh interpreter that
    finds it, ``fdm`` offers ``--model toyfam`` and ``--toy-config`` and runs the doc's commands, with no
    register_family call anywhere."""
    package, site, work = tmp_path / "toyfam-package", tmp_path / "site", tmp_path / "work"
    _write_package(package)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(package)], check=True, capture_output=True)
    assert list(site.glob("toyfam-0.1.0.dist-info/entry_points.txt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    work.mkdir()

    def fdm_command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fdm.cli", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)

    shown = fdm_command("eval", "--help")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"--model \{[^}]*\btoyfam\b", shown.stdout) and "toyfam family:" in shown.stdout
    assert "--toy-config JSON" in shown.stdout
    use = [body for lang, name, body in _blocks() if lang == "python" and not name][1]
    made = subprocess.run([sys.executable, "-c", use], cwd=work, env=env, capture_output=True, text=True)
    assert made.returncode == 0 and "torch.Size([1, 3, 32, 32])" in made.stdout, made.stderr
    _photos(work / "photos")
    for command in _doc_commands():
        result = fdm_command(*command[1:])
        assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "toyfam" and report["views"] == 2
    wrong = fdm_command("eval", "photos", "--model", "toyfam", "--checkpoint", "toy.safetensors", "--toy-config",
                        "missing.json", "--fdm", "fdm-toy", "--no-extras")
    assert wrong.returncode == 2 and "missing.json" in wrong.stderr and "Traceback" not in wrong.stderr


def _installed_family(folder: Path, entry: str, module_text: str | None) -> None:
    """A distribution ``plugin`` in ``folder`` (its dist-info, as pip writes it) declaring the entry point
    ``entry`` of the group fdm.families; ``module_text``: the module ``plugin.py`` (None: no module)."""
    info = folder / "plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[fdm.families]\n{entry}\n")
    if module_text is not None:
        (folder / "plugin.py").write_text(module_text)


def test_an_installed_family_named_like_another_is_refused(tmp_path, monkeypatch, registry_restored, capsys):
    _installed_family(tmp_path, "second = plugin:FAMILY", "from fdm.registry import ModelFamily\n"
                      "from toy_vq import ToyVQAdapter\nFAMILY = ModelFamily(name='taming', adapters=(ToyVQAdapter,))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(fdm.errors.ConfigError, match=r"two model families are called 'taming': the one of "
                       r"fdm.adapters.taming and the one of entry point 'second' of the installed package plugin"):
        list(registry.families())
    from fdm.cli import main

    assert main(["eval", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fdm: error: two model families are called 'taming'") and err.count("\n") == 1


def test_an_installed_family_that_cannot_be_imported_names_its_package(tmp_path, monkeypatch, registry_restored):
    _installed_family(tmp_path, "broken = no_such_module_here:FAMILY", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(fdm.errors.ConfigError, match=r"entry point 'broken' of the installed package plugin "
                                                     r"\(no_such_module_here:FAMILY\) cannot be imported"):
        list(registry.families())


def test_a_family_option_the_command_has_already_is_refused(tmp_path, monkeypatch, registry_restored):
    (tmp_path / "clashing.py").write_text("from fdm.registry import ModelFamily\nfrom toy_vq import ToyVQAdapter\n"
                                          "FAMILY = ModelFamily(name='clash', adapters=(ToyVQAdapter,), "
                                          "cli_options={'--checkpoint': {'help': 'mine'}})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.register_family("clashing")
    from fdm.cli import build_parser

    with pytest.raises(fdm.errors.ConfigError, match=r"model family 'clash': cannot add its option --checkpoint"):
        build_parser()
    with pytest.raises(fdm.errors.ConfigError, match="cli_options are flags"):
        registry.ModelFamily(name="x", adapters=(), cli_options={"config": {}})


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


def test_a_model_choice_or_sub_command_declared_twice_is_refused(tmp_path, monkeypatch, registry_restored):
    (tmp_path / "twice.py").write_text("from fdm.registry import CliModel, ModelFamily\nfrom toy_vq import ToyVQAdapter\n"
                                       "FAMILY = ModelFamily(name='twice', adapters=(ToyVQAdapter,), "
                                       "cli_models={'taming': CliModel(lambda args: None)}, "
                                       "commands={'sample': 'twice'})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.register_family("twice")
    with pytest.raises(fdm.errors.ConfigError, match="--model taming is declared by both taming and twice"):
        registry.cli_models()
    with pytest.raises(fdm.errors.ConfigError, match="the sub-command sample is declared by both taming and twice"):
        registry.cli_commands()
