"""User errors (issue 12, item 5): the `fdm` command prints ONE line to stderr and exits with 2, no traceback
(tracebacks only with --debug); programming errors keep their traceback. The library raises the fdm.errors
types for the same bad inputs: unparsable YAML / JSON (file and line), unknown Hub repos and files, offline mode
without a cached copy, unreadable images and masks, 16-bit images read with their full range, masks of another
size than their image.

The command-line cases run `fdm.cli.main` in this process, with the command's own logging to stderr (fixture
`run_here`); those that depend on what huggingface_hub reads from the environment at import (endpoint, offline
mode) run `python -m fdm.cli` in a subprocess (about 3 s each: it imports torch), with an empty Hugging Face cache
and offline mode on unless a test serves a local Hub (tests/hub_server.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdm import cli
from fdm.config_io import read_json, read_yaml
from fdm.errors import (
    CheckpointError,
    ConfigError,
    FdmError,
    FingerprintMismatchError,
    HubEntryNotFoundError,
    HubError,
    InputError,
    MissingExtraError,
    TrainingError,
    UsageError,
)
from fdm.images import read_gray, read_image
from fdm.masks import load_mask

TESTS = Path(__file__).resolve().parent
PUT_CODEC = TESTS / "data" / "put" / "put_tiny_p_vqvae.safetensors"


def fdm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No Hub access unless a test gives HF_ENDPOINT: offline mode, an empty cache."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    env.update(extra)
    return env


def run_fdm(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fdm.cli", *args], cwd=tmp_path, env=fdm_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_here(tmp_path, monkeypatch, capsys):
    """``fdm ARGS`` run in this process as a fresh interpreter runs it: in ``tmp_path``, with the logging that
    ``fdm.cli.main`` sets up writing to stderr (pytest's log capture set aside for the call), argparse's exit
    turned into the exit code."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        root.handlers.clear()  # so that main's logging.basicConfig installs its stderr handler
        try:
            code = cli.main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["fdm", *args], code, out, err)

    return run


def assert_one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit code 2, exactly one non-empty stderr line holding every phrase, no traceback anywhere."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """A 64x64 RGB image, a 32x32 mask, a file that is not an image, and an FDM folder whose config.json is cut."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "photo.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask32.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "fdm-cut").mkdir()
    (tmp_path / "fdm-cut" / "config.json").write_text('{\n  "channels": 4,\n  "num_blocks":\n')
    return folder


# --- the error types -----------------------------------------------------------------------------------------


def test_error_hierarchy_keeps_the_old_bases():
    for cls in (InputError, ConfigError, UsageError, CheckpointError, FingerprintMismatchError, TrainingError):
        assert issubclass(cls, FdmError) and issubclass(cls, ValueError)
    assert issubclass(MissingExtraError, FdmError) and issubclass(MissingExtraError, ImportError)
    assert issubclass(HubError, FdmError) and issubclass(HubError, FileNotFoundError)
    assert issubclass(HubEntryNotFoundError, HubError) and issubclass(HubEntryNotFoundError, CheckpointError)
    assert cli.is_user_error(MissingExtraError('pip install "fdm-vq[taming]"'))
    assert not cli.is_user_error(ImportError("cannot import name 'x' from 'fdm.y'"))  # a bug, not a missing extra
    assert not cli.is_user_error(ValueError("boom")) and not cli.is_user_error(TypeError("boom"))


@pytest.mark.parametrize("error", [TypeError("a bug"), ValueError("a bug"), KeyError("a bug")])
def test_programming_errors_are_not_caught(monkeypatch, tmp_path, error):
    import fdm.commands.demo as demo

    def run(args):
        raise error

    monkeypatch.setattr(demo, "run", run)
    with pytest.raises(type(error)):
        cli.main(["demo", "--out", str(tmp_path / "out")])


def test_user_errors_in_process_return_2(monkeypatch, tmp_path, capsys):
    import fdm.commands.demo as demo

    def run(args):
        assert (tmp_path / "out").is_dir()  # --out is created before the command runs
        raise CheckpointError("the weights\ndo not fit")

    monkeypatch.setattr(demo, "run", run)
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "fdm demo: error: the weights do not fit\n"
    assert not (tmp_path / "out").exists()  # ... and removed again, empty, when it fails


# --- argparse: counts and ranges -------------------------------------------------------------------------------

TRAIN = ["train", "--data", "d", "--out", "o"]
FINETUNE = ["finetune", "--data", "d", "--out", "o"]
INPAINT = ["inpaint", "--image", "a.png", "--mask", "m.png", "--out", "o"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "d", "--views-per-image", "0"], "argument --views-per-image: expected an integer >= 1; got 0"),
    (["eval", "d", "--crop", "0"], "argument --crop-size/--crop: expected an integer >= 1; got 0"),
    (["eval", "d", "--device", "gpu9"], "argument --device: expected a torch device such as cpu, cuda or cuda:1; got 'gpu9'"),
    (["demo", "--device", "cuda:99"], "argument --device: cuda:99: this machine has "),
    (["eval", "d", "--batch-size", "-2"], "argument --batch-size: expected an integer >= 1; got -2"),
    ([*TRAIN, "--steps", "0"], "argument --steps: expected an integer >= 1; got 0"),
    ([*TRAIN, "--epochs", "0"], "argument --epochs: expected an integer >= 1; got 0"),
    ([*TRAIN, "--steps", "1", "--batch-size", "0"], "argument --batch-size"),
    ([*TRAIN, "--steps", "1", "--views-per-image", "0"], "argument --views-per-image"),
    ([*TRAIN, "--steps", "1", "--crop-size", "0"], "argument --crop-size"),
    ([*TRAIN, "--steps", "1", "--lr", "0"], "argument --lr: expected a number > 0; got 0"),
    ([*TRAIN, "--steps", "1", "--lr", "nan"], "argument --lr: expected a number > 0; got nan"),
    ([*TRAIN, "--steps", "1", "--warmup-steps", "-1"], "argument --warmup-steps: expected an integer >= 0"),
    ([*TRAIN, "--steps", "1", "--hidden-channels", "1"], "argument --hidden-channels: expected an integer >= 2"),
    ([*TRAIN, "--steps", "1", "--hole-ratio", "0.2", "1.5"], "argument --hole-ratio: expected a number in [0, 1]"),
    ([*TRAIN, "--steps", "x"], "argument --steps: expected an integer >= 1; got 'x'"),
    ([*FINETUNE, "--steps", "0"], "argument --steps"),
    ([*FINETUNE, "--steps", "1", "--num-val-images", "0"], "argument --num-val-images"),
    ([*FINETUNE, "--steps", "1", "--loss-weight", "l1=-1"], "argument --loss-weight: l1=-1: expected a number >= 0"),
    ([*FINETUNE, "--steps", "1", "--start-step", "l1=-5"], "argument --start-step: l1=-5: expected an integer >= 0"),
    (["sample", "unconditional", "--out", "o", "--num-samples", "0"], "argument --num-samples"),
    (["sample", "class", "--out", "o", "--classes", "3", "--per-class", "0"], "argument --per-class"),
    (["sample", "class", "--out", "o", "--classes", "-1"], "argument --classes: expected an integer >= 0"),
    (["sample", "unconditional", "--out", "o", "--top-p", "0"], "argument --top-p: expected a number in (0, 1]"),
    (["sample", "unconditional", "--out", "o", "--top-k", "0"], "argument --top-k"),
    (["sample", "unconditional", "--out", "o", "--batch-size", "0"], "argument --batch-size"),
    (["sample", "semantic", "--out", "o", "--segmentation", "s.png", "--window", "0"], "argument --window"),
    ([*INPAINT, "--num-samples", "0"], "argument --num-samples"),
    ([*INPAINT, "--size", "0", "8"], "argument --size"),
    ([*INPAINT, "--cells-per-step", "0"], "argument --cells-per-step"),
    ([*INPAINT, "--temperature", "0"], "argument --temperature"),
])
def test_counts_and_ranges_are_argument_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_count_of_zero_from_the_command_line(run_here, image_dir):
    line = assert_one_line_error(run_here("eval", str(image_dir), "--views-per-image", "0"),
                                 "argument --views-per-image: expected an integer >= 1; got 0")
    assert line.startswith("fdm eval: error:")


# --- --out ------------------------------------------------------------------------------------------------------


def test_out_folder_is_created_or_refused(tmp_path):
    made = cli.prepare_output_dir(tmp_path / "a" / "b")
    assert made.is_dir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="file.txt exists and is not a folder"):
        cli.prepare_output_dir(tmp_path / "file.txt")
    with pytest.raises(UsageError, match="cannot create the output folder"):
        cli.prepare_output_dir(tmp_path / "file.txt" / "sub")


def test_invalid_out_from_the_command_line(tmp_path, run_here):
    (tmp_path / "file.txt").write_text("x")
    assert_one_line_error(run_here("demo", "--out", "file.txt/figures"),
                          "--out file.txt/figures: cannot create the output folder")


# --- config files ---------------------------------------------------------------------------------------------


def test_a_failed_command_removes_the_empty_out_folders_it_made(tmp_path, run_here):
    for out in ("runs/new/fdm", "kept/new"):
        result = run_here("train", "--data", "missing-photos", "--out", out)
        assert result.returncode == 2 and "Training data not found: missing-photos" in result.stderr
        assert not (tmp_path / "runs").exists()
        (tmp_path / "kept").mkdir(exist_ok=True)
        (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]  # what was there stays


def test_json_and_yaml_errors_name_file_and_line(tmp_path):
    bad_json = tmp_path / "config.json"
    bad_json.write_text('{\n  "a": 1,\n  "b": ]\n}\n')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON: line 3 column 8") as err:
        read_json(bad_json, "FDM config")
    assert str(bad_json) in str(err.value)
    bad_yaml = tmp_path / "model.yaml"
    bad_yaml.write_text("model:\n  params:\n    - a\n   b: 1\n")
    with pytest.raises(ConfigError, match=r"model.yaml is not valid YAML: line 4 column 4") as err:
        read_yaml(bad_yaml)
    assert str(bad_yaml) in str(err.value)
    bad_json.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_json(bad_json)


def test_only_rank_0_of_a_distributed_run_prints_info_lines(run_here, image_dir, monkeypatch):
    photos = image_dir.parent / "photos"
    photos.mkdir()
    (image_dir / "photo.png").rename(photos / "photo.png")
    command = ["eval", "photos", "--crop-size", "32", "--views-per-image", "1", "--no-extras", "--no-progress"]
    assert "1 views (crop 32) of folder photos" in run_here(*command).stderr
    monkeypatch.setenv("RANK", "1")
    result = run_here(*command)
    assert result.returncode == 0 and result.stderr == ""


def test_deep_or_exploding_configs_are_refused(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")  # past the recursion limit of json.loads
    with pytest.raises(ConfigError, match="deep.json nests too deeply to parse"):
        read_json(deep)
    deep.write_text('{"a": ' + "[" * 70 + "]" * 70 + "}")  # parses, but deeper than any config
    with pytest.raises(ConfigError, match="deep.json nests deeper than 64 levels"):
        read_json(deep)
    laughs = tmp_path / "laughs.yaml"  # nine levels of ten aliases: 10**9 values once expanded
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    laughs.write_text("\n".join(lines) + "\nmodel: *a8\n")
    with pytest.raises(ConfigError, match="laughs.yaml holds more than 100000 values"):
        read_yaml(laughs)


def test_fdm_config_json_that_does_not_parse(image_dir):
    import fdm

    with pytest.raises(ConfigError, match=r"fdm-cut/config.json is not valid JSON: line 4 column 1"):
        fdm.FDM.from_pretrained(image_dir.parent / "fdm-cut")


def test_yaml_that_does_not_parse_from_the_command_line(tmp_path, run_here):
    pytest.importorskip("taming")
    (tmp_path / "model.yaml").write_text("model:\n  target: taming.models.vqgan.VQModel\n  params: [1, 2\n")
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert_one_line_error(
        run_here("sample", "unconditional", "--config", "model.yaml", "--checkpoint", "last.ckpt",
                "--out", "samples", "--no-fdm"),
        "taming config model.yaml is not valid YAML: line 4",
    )


def test_json_that_does_not_parse_from_the_command_line(run_here, image_dir):
    assert_one_line_error(run_here("eval", str(image_dir), "--fdm", "fdm-cut"),
                          "FDM config fdm-cut/config.json is not valid JSON: line 4 column 1")


def test_debug_shows_the_traceback(run_here, image_dir):
    result = run_here("--debug", "eval", str(image_dir), "--fdm", "fdm-cut")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr and "json.decoder.JSONDecodeError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fdm eval: error: FDM config")


# --- the Hugging Face Hub ---------------------------------------------------------------------------------------


def _hub_with_a_repo_without_fdm(hub) -> None:
    from hub_server import Blob, Repo

    repo = Repo(private=False)
    repo.add_commit("main", {"README.md": Blob(b"# not an FDM\n", lfs=False)}, "initial commit")
    hub.repos["tester/not-an-fdm"] = repo


def test_unknown_hub_repo_and_file_from_the_command_line(tmp_path, image_dir, local_hub):
    _hub_with_a_repo_without_fdm(local_hub)
    online = {"HF_ENDPOINT": local_hub.url, "HF_HUB_OFFLINE": "0"}
    assert_one_line_error(run_fdm(tmp_path, "eval", str(image_dir), "--fdm", "tester/no-such-repo", **online),
                          "Hub repo tester/no-such-repo not found")
    assert_one_line_error(run_fdm(tmp_path, "eval", str(image_dir), "--fdm", "tester/not-an-fdm", **online),
                          "Hub repo tester/not-an-fdm", "has no file config.json")


def test_offline_mode_without_a_cached_copy_from_the_command_line(tmp_path, image_dir):
    assert_one_line_error(run_fdm(tmp_path, "eval", str(image_dir), "--fdm", "tester/fdm-vqgan"),
                          "Hub repo tester/fdm-vqgan", "offline mode is on (HF_HUB_OFFLINE=1)")


HUB_ERRORS = """
    import json, sys
    from fdm.io.hub import resolve_file
    from fdm.adapters.put import load_model as load_put
    from fdm.adapters.taming import load_model as load_taming

    calls = {
        "repo": lambda: resolve_file("tester/no-such-repo", "model.safetensors"),
        "revision": lambda: resolve_file("tester/not-an-fdm", "model.safetensors", revision="v9"),
        "file": lambda: resolve_file("tester/not-an-fdm", "model.safetensors"),
        "put": lambda: load_put("hf://tester/not-an-fdm/p_vqvae.pth"),
        "taming": lambda: load_taming("hf://tester/not-an-fdm/configs/model.yaml", "hf://tester/not-an-fdm/last.ckpt"),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except Exception as err:
            out[name] = [[c.__name__ for c in type(err).__mro__], str(err)]
    print(json.dumps(out))
"""


def test_hub_errors_become_fdm_errors(tmp_path, local_hub):
    _hub_with_a_repo_without_fdm(local_hub)
    env = fdm_env(tmp_path, HF_ENDPOINT=local_hub.url, HF_HUB_OFFLINE="0")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(HUB_ERRORS)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["repo"][0][0] == "HubError" and "Hub repo tester/no-such-repo not found" in out["repo"][1]
    assert out["revision"][0][0] == "HubError" and "has no revision v9" in out["revision"][1]
    for name, filename in [("file", "model.safetensors"), ("put", "p_vqvae.pth"), ("taming", "configs/model.yaml")]:
        types, message = out[name]
        assert types[0] == "HubEntryNotFoundError" and "CheckpointError" in types and "FileNotFoundError" in types
        assert f"Hub repo tester/not-an-fdm on {local_hub.url} (revision main) has no file {filename}" in message


# --- images and masks -----------------------------------------------------------------------------------------


def test_sixteen_bit_images_and_masks_keep_their_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16"
    image = read_image(tmp_path / "ramp16.png")
    assert image.shape == (1, 3, 64, 64)
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535 * 2 - 1)
    torch.testing.assert_close(image[0, 0], expected, rtol=0, atol=1e-5)
    assert float(image.mean()) == pytest.approx(0.0, abs=1e-3)  # not clipped to white
    assert read_image(tmp_path / "ramp16.png", size=(32, 32)).shape == (1, 3, 32, 32)
    # a mask: dark-ish 16-bit values (below half range) are known pixels, not holes
    mask = np.full((16, 16), 20000, dtype=np.uint16)
    mask[4:12, 4:12] = 50000
    Image.fromarray(mask).save(tmp_path / "mask16.png")
    loaded = load_mask(tmp_path / "mask16.png")
    assert float(loaded.sum()) == 64 and float(loaded[0, 0, 4, 4]) == 1 and float(loaded[0, 0, 0, 0]) == 0
    assert load_mask(tmp_path / "mask16.png", size=(32, 32)).sum() == 256
    # 8-bit files keep the 128 threshold
    Image.fromarray(np.array([[127, 128]], dtype=np.uint8)).save(tmp_path / "mask8.png")
    assert load_mask(tmp_path / "mask8.png").flatten().tolist() == [0.0, 1.0]
    assert read_gray(tmp_path / "mask8.png").flatten().tolist() == pytest.approx([127 / 255, 128 / 255])


def test_unreadable_image_and_mask_files(tmp_path, image_dir):
    broken = tmp_path / "broken.png"
    with pytest.raises(InputError, match="Cannot read image file .*broken.png"):
        read_image(broken)
    with pytest.raises(InputError, match="Cannot read mask file .*broken.png"):
        load_mask(broken)
    with pytest.raises(InputError, match="is not a file"):
        read_image(image_dir)
    with pytest.raises(InputError, match="Image file not found"):
        read_image(tmp_path / "missing.png")


def malformed_tiff() -> bytes:
    """A 4x4 gray TIFF whose StripOffsets tag is text: Pillow raises TypeError while decoding it."""
    import struct

    def entry(tag: int, kind: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag, kind, 1 if kind != 2 else len(value)) + value.ljust(4, b"\0")

    entries = [entry(256, 3, b"\4"), entry(257, 3, b"\4"), entry(258, 3, b"\x08"), entry(262, 3, b"\1"),
               entry(273, 2, b"abc\0"), entry(277, 3, b"\1"), entry(279, 4, b"\x10")]
    return b"II*\0" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + b"\0" * 68


def test_a_tiff_that_breaks_the_decoder_is_an_unreadable_image(tmp_path, run_here, image_dir):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "bad.tif").write_bytes(malformed_tiff())
    with pytest.raises(InputError, match=r"Cannot read image file .*bad.tif: ") as err:
        read_image(tmp_path / "photos" / "bad.tif")
    assert isinstance(err.value.__cause__, TypeError)  # what Pillow raises there (it was a traceback)
    result = run_here("eval", "photos", "--no-extras", "--no-progress")
    assert result.returncode == 2 and re.search(r"fdm eval: error: Cannot read \w* ?image file photos/bad.tif",
                                                result.stderr)
    assert "Traceback" not in result.stderr


def test_unreadable_image_from_the_command_line(run_here, image_dir):
    assert_one_line_error(
        run_here("inpaint", "--checkpoint", str(PUT_CODEC), "--image", "broken.png", "--mask", "mask32.png",
                "--out", "out"),
        "fdm inpaint: error: Cannot read image file broken.png",
    )


def test_mask_of_another_size_is_refused_unless_resize_mask(tmp_path, image_dir, run_here):
    from fdm.adapters.put.command import read_inputs

    photo, mask = str(image_dir / "photo.png"), str(tmp_path / "mask32.png")
    options = argparse.Namespace(resize_mask=False, size=None, white_is_known=False)
    with pytest.raises(InputError, match=r"mask .*mask32.png is 32x32 but image .*photo.png is 64x64"):
        read_inputs(photo, mask, options)
    image, hole = read_inputs(photo, mask, argparse.Namespace(resize_mask=True, size=None, white_is_known=False))
    assert image.shape == (1, 3, 64, 64) and hole.shape == (1, 1, 64, 64) and float(hole.sum()) == 32 * 32
    image, hole = read_inputs(photo, photo, argparse.Namespace(resize_mask=False, size=[32, 40], white_is_known=False))
    assert image.shape == (1, 3, 32, 40) and hole.shape == (1, 1, 32, 40)  # --size resizes both

    assert_one_line_error(
        run_here("inpaint", "--checkpoint", str(PUT_CODEC), "--image", photo, "--mask", "mask32.png",
                "--out", "out"),
        "mask mask32.png is 32x32 but image", "is 64x64", "--resize-mask",
    )


@pytest.mark.parametrize("command", sorted(cli.commands()))
def test_every_command_prints_its_help(command, capsys):
    """``--help`` of every sub-command prints and exits 0 (argparse %-formats help texts: a bare '%' broke it)."""
    with pytest.raises(SystemExit) as stopped:
        cli.main([command, "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fdm {command}")


def test_the_data_is_checked_before_the_model_is_loaded(tmp_path, run_here):
    """A mistyped --data fails at once, not after the (possibly large) model has been read: here the checkpoint
    is no checkpoint at all, and the error is still about the data."""
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    model = ["--model", "taming", "--config", str(tmp_path / "model.yaml"), "--checkpoint", "broken.ckpt"]
    (tmp_path / "model.yaml").write_text("model: {}\n")
    result = run_here("train", "--data", "missing-photos", "--out", "out", *model)
    assert result.returncode == 2 and "Training data not found: missing-photos" in result.stderr
    result = run_here("finetune", "--data", "missing-photos", "--out", "out", "--steps", "1", "--fdm", "none", *model)
    assert result.returncode == 2 and "Training data not found: missing-photos" in result.stderr
    result = run_here("train", "--data", str(tmp_path), "--out", "out", "--minutes", "1", "--warmup-steps", "5", *model)
    assert result.returncode == 2 and "--warmup-steps counts steps" in result.stderr


def test_skip_bad_images_leaves_out_and_lists_what_cannot_be_decoded(tmp_path, run_here):
    """By default a training image that cannot be decoded stops the run, naming it; --skip-bad-images reads every
    image first and trains on the others, listing the skipped ones with their count."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    (photos / "bad.tif").write_bytes(malformed_tiff())
    (photos / "cut.png").write_bytes((photos / "p0.png").read_bytes()[:60])
    run = ["train", "--data", "photos", "--steps", "2", "--batch-size", "2", "--crop-size", "16",
           "--views-per-image", "1", "--val-fraction", "0", "--no-progress"]
    result = run_here(*run, "--out", "stops")
    assert result.returncode == 2 and re.search(r"Cannot read \w* ?image file photos/bad.tif", result.stderr)
    result = run_here(*run, "--out", "skips", "--skip-bad-images")
    assert result.returncode == 0, result.stderr
    assert "--data photos: skipped 2 unreadable images: bad.tif, cut.png" in result.stderr
    trained = json.loads((tmp_path / "skips" / "config.json").read_text())["training"]
    assert trained["steps"] == 2 and trained["views"] == 3  # one view of each readable image
    (photos / "p0.png").write_bytes(b"")
    (photos / "p1.png").write_bytes(b"")
    (photos / "p2.png").write_bytes(b"")
    result = run_here(*run, "--out", "none", "--skip-bad-images")
    assert result.returncode == 2 and "none of the 5 images of folder photos can be read" in result.stderr
