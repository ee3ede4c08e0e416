"""`fdm train` and `fdm finetune` options are made from the config dataclasses: every default is the field's, shown
in --help, and every option reaches its field."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from fdm.commands import finetune as finetune_command
from fdm.commands import train as train_command
from fdm.commands.config_options import ConfigOption, add_config_options, config_from_args, field_defaults
from fdm.training import Phase2Config, Phase3Config


def parse(command, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def differing(config, reference) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(reference, f.name)}


def test_without_options_every_field_keeps_its_dataclass_default():
    args = parse(train_command, ["--data", "photos", "--out", "mine", "--device", "cpu"])
    config = train_command.phase2_config(args)
    # only what the command derives differs from the dataclass: the run length, the folder, the names
    assert differing(config, Phase2Config(epochs=1)) == {"epochs": train_command.DEFAULT_EPOCHS, "output_dir": "mine",
                                                         "device": "cpu", "base_model": "demo"}
    args = parse(finetune_command, ["--data", "photos", "--out", "ft", "--steps", "7", "--device", "cpu",
                                    "--fdm", "fdm-mine"])
    assert differing(finetune_command.phase3_config(args), Phase3Config()) == {"steps": 7, "output_dir": "ft",
                                                                                "device": "cpu"}


@pytest.mark.parametrize(("command", "argv", "field", "value"), [
    (train_command, ["--cache-dtype", "bfloat16"], "cache_dtype", "bfloat16"),
    (train_command, ["--hole-ratio", "0.1", "0.3"], "hole_ratio", (0.1, 0.3)),
    (train_command, ["--no-mask"], "hole_ratio", None),
    (train_command, ["--patience", "0"], "patience", None),
    (train_command, ["--no-progress"], "progress", False),
    (train_command, ["--hidden-channels", "48", "--num-blocks", "4"], "hidden_channels", 48),
    (finetune_command, ["--no-perceptual"], "drop_vgg_terms", True),
    (finetune_command, ["--grad-clip", "0"], "grad_clip", None),
    (finetune_command, ["--no-adversarial"], "weights", {"adversarial": 0.0}),
    (finetune_command, ["--freeze-decoder", "--precision", "bf16"], "freeze_decoder", True),
    (finetune_command, ["--loss-weight", "l1=2", "--start-step", "gradient=5"], "start_steps", {"gradient": 5}),
])
def test_each_option_reaches_its_field(command, argv, field, value):
    base = ["--data", "photos", "--out", "run"] + (["--steps", "3", "--fdm", "f"] if command is finetune_command else [])
    args = parse(command, base + argv)
    config = (train_command.phase2_config if command is train_command else finetune_command.phase3_config)(args)
    assert getattr(config, field) == value


@pytest.mark.parametrize(("command", "config_class"), [(train_command, Phase2Config),
                                                        (finetune_command, Phase3Config)])
def test_help_shows_the_dataclass_defaults(command, config_class):
    parser = argparse.ArgumentParser(prog="fdm", formatter_class=lambda prog: argparse.HelpFormatter(
        prog, width=10**4, max_help_position=10**3))  # one line per option
    command.add_arguments(parser)
    text = parser.format_help()
    defaults = field_defaults(config_class)
    for flag, field in (("--batch-size", "batch_size"), ("--lr", "lr"), ("--checkpoint-every", "checkpoint_every"),
                        ("--precision", "precision"), ("--seed", "seed")):
        line = next(line for line in text.splitlines() if line.strip().startswith(flag))
        assert f"(default {defaults[field]})" in line, line


def test_options_and_values_are_checked():
    @dataclasses.dataclass
    class Settings:
        size: int = 3
        name: str | None = None
        fast: bool = True

    parser = argparse.ArgumentParser()
    add_config_options(parser, Settings, [ConfigOption("size", "how big", int), ConfigOption("name", "what"),
                                          ConfigOption("fast", "slowly", flag="--slow")])
    assert config_from_args(Settings, parser.parse_args([])) == Settings()
    assert config_from_args(Settings, parser.parse_args(["--size", "5", "--slow"])) == Settings(5, None, False)
    assert "how big (default 3)" in parser.format_help() and "what\n" in parser.format_help()
    with pytest.raises(TypeError, match=r"no fields \['colour'\]"):
        config_from_args(Settings, parser.parse_args([]), colour="red")


@pytest.mark.parametrize("command", [train_command, finetune_command])
def test_resume_and_overwrite_are_refused_together_before_anything_loads(command, capsys):
    with pytest.raises(SystemExit) as err:
        parse(command, ["--data", "photos", "--out", "run", "--steps", "3", "--resume", "--overwrite"])
    assert err.value.code == 2 and "--overwrite: not allowed with argument --resume" in capsys.readouterr().err
