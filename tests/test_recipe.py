"""The default phase-2 recipe, time budgets (--minutes) and held-out checks (--val-fraction) of fdm train."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import pytest
import torch
from test_training_data import write_images

import fdm
from fdm.commands import train as train_command
from fdm.errors import InputError
from fdm.training import (
    HeldOutCheck,
    ImageFolderViews,
    Phase2Config,
    Phase2Trainer,
    SeededViews,
    latest_checkpoint,
    open_source,
    split_heldout,
)
from fdm.training.recipe import MAX_VIEWS_PER_IMAGE, MIN_WIDTH, crop_size_for, fdm_width, views_per_image_for
from fdm.training.schedule import ProgressLR, RunBudget
from toy_vq import ToyVQ

EVAL_PHOTOS = Path(__file__).resolve().parents[1] / "data" / "eval-photos"
SIZES = [(40, 56), (64, 48), (32, 32), (24, 40), (48, 48), (56, 40), (40, 40), (64, 64), (32, 48), (48, 32)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("recipe") / "images", SIZES)


@pytest.fixture
def model(spread_toy_model):
    return spread_toy_model


def split_views(folder, fraction=0.2):
    train, held = split_heldout(open_source(folder), fraction, seed=0)
    return (SeededViews(train, crop_size=16, views_per_image=4, seed=0),
            SeededViews(held, crop_size=16, views_per_image=4, seed=1))


def config(tmp_path, **overrides):
    settings = dict(steps=40, batch_size=8, lr=3e-3, progress=False, checkpoint_every=0, log_every=10,
                    hole_ratio=None, hidden_channels=16, num_blocks=2, output_dir=str(tmp_path / "out"))
    return Phase2Config(**(settings | overrides))


def test_recipe_sizes_the_fdm_and_the_views_from_model_and_data():
    assert fdm_width(16) == MIN_WIDTH and fdm_width(128) == 128 and fdm_width(1024) == 256  # the paper's at 256
    assert crop_size_for(4) == 64 and crop_size_for(16) == 256
    assert views_per_image_for(12) == MAX_VIEWS_PER_IMAGE and views_per_image_for(100_000) == 1
    assert 1 < views_per_image_for(258) < MAX_VIEWS_PER_IMAGE
    # a trainer without hidden_channels builds the recipe's width, not the model's channel count
    trainer = Phase2Trainer(ToyVQ().eval(), fdm.training.TensorViews(torch.zeros(2, 3, 16, 16)),
                            Phase2Config(steps=1, batch_size=2, output_dir="unused"))
    assert trainer.fdm.hidden_channels == MIN_WIDTH and trainer.fdm.channels == 8


def test_config_needs_a_length_and_a_step_count_for_step_warmups():
    assert Phase2Config(minutes=2).minutes == 2 and Phase2Config(minutes=2, steps=10).steps == 10
    with pytest.raises(InputError, match="steps, epochs or minutes"):
        Phase2Config()
    with pytest.raises(InputError, match="not both"):
        Phase2Config(steps=3, epochs=3)
    with pytest.raises(InputError, match="warmup_steps needs a step count"):
        Phase2Config(minutes=1, warmup_steps=10)
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(InputError, match="minutes must be a positive number"):
            Phase2Config(minutes=bad)
    with pytest.raises(InputError, match="checks and patience"):
        Phase2Config(steps=3, patience=0)


def test_progress_and_learning_rate_follow_steps_or_time():
    steps = RunBudget(steps=100)
    assert steps.progress(25, elapsed=1e9) == 0.25 and steps.progress(200, 0) == 1.0
    timed = RunBudget(seconds=60)
    assert timed.progress(10_000, 30) == 0.5
    both = RunBudget(steps=100, seconds=60)
    assert both.progress(10, 30) == 0.5 and both.progress(90, 30) == 0.9  # whichever ends the run first
    with pytest.raises(ValueError, match="neither"):
        RunBudget()
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight], lr=1e-3)
    schedule = ProgressLR(optimizer, warmup=0.1, min_lr=1e-6)
    rates = []
    for progress in (0.05, 0.1, 0.55, 1.0):
        schedule.step(progress)
        rates.append(schedule.last_lr)
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(1e-3)  # linear warm-up to the peak
    assert rates[2] == pytest.approx((1e-3 + 1e-6) / 2) and rates[3] == pytest.approx(1e-6)  # cosine to min_lr


def test_split_holds_out_a_fraction_of_the_images_at_least_one(folder, caplog):
    source = open_source(folder)
    train, held = split_heldout(source, 0.1, seed=0)
    assert len(held) == 1 and len(train) == len(source) - 1
    train, held = split_heldout(source, 0.3, seed=0)
    assert len(held) == 3 and not set(train.indices) & set(held.indices)
    assert held.names() == [source.names()[i] for i in held.indices]
    again = split_heldout(source, 0.3, seed=0)[1]
    assert again.indices == held.indices and split_heldout(source, 0.3, seed=1)[1].indices != held.indices
    assert split_heldout(source, 0.0)[1] is None
    single = write_images(folder.parent / "single", [(32, 32)])
    with caplog.at_level(logging.WARNING):
        assert split_heldout(open_source(single), 0.1)[1] is None
    assert "nothing held out" in caplog.text
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        split_heldout(source, 1.0)


def test_held_out_checks_keep_the_best_weights_and_record_them(tmp_path, model, folder):
    views, heldout = split_views(folder)
    trainer = Phase2Trainer(model, views, config(tmp_path, checks=5, patience=None), heldout_views=heldout)
    trained = trainer.train()
    assert [c["step"] for c in trainer.heldout.checks] == [8, 16, 24, 32, 40]
    best = min(trainer.heldout.checks, key=lambda c: c["feature_ratio"])
    assert trainer.heldout_step == best["step"]
    # the saved weights are the best check's: measuring them again gives its ratio
    check = HeldOutCheck(model, trainer.adapter, heldout, hole_ratio=None)
    result = check.measure(trained, decode=True)
    assert result.feature_ratio == pytest.approx(best["feature_ratio"], abs=1e-6)
    assert result.feature_ratio < 1.0 and result.psnr_gain == pytest.approx(trainer.heldout_result.psnr_gain)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["training"]["heldout"]
    assert saved["images"] == 2 and saved["setting"] == "reconstruction" and saved["step"] == best["step"]
    assert saved["feature_ratio"] == pytest.approx(best["feature_ratio"], abs=1e-4)


def test_no_held_out_improvement_stops_early(tmp_path, model, folder, caplog):
    views, heldout = split_views(folder)
    frozen = config(tmp_path, lr=1e-12, checks=10, patience=2)  # nothing learns: no check beats the first
    trainer = Phase2Trainer(model, views, frozen, heldout_views=heldout)
    with caplog.at_level(logging.INFO, logger="fdm.training.phase2"):
        trainer.train()
    assert trainer.step == 12 and len(trainer.heldout.checks) == 3  # checks at 4, 8, 12 steps: two without progress
    assert "stopping early at step 12" in caplog.text
    assert trainer.heldout_step == min(trainer.heldout.checks, key=lambda c: c["feature_ratio"])["step"]


def test_a_time_budget_ends_the_run_and_decays_the_rate(tmp_path, model, folder):
    views, heldout = split_views(folder)
    budget = 3.0  # seconds, feature cache included
    trainer = Phase2Trainer(model, views, config(tmp_path, steps=None, minutes=budget / 60, checks=2),
                            heldout_views=heldout)
    started = time.perf_counter()
    trainer.train()
    assert trainer.step > 10 and time.perf_counter() - started < budget + 5
    assert trainer.loop_seconds <= budget and trainer.train_seconds == pytest.approx(trainer.loop_seconds, abs=1.0)
    assert [round(c["progress"], 1) for c in trainer.heldout.checks][-1] == 1.0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["training"]
    assert saved["minutes"] == pytest.approx(0.05) and saved["steps"] == trainer.step


def test_a_time_budget_survives_a_resume(tmp_path, model, folder):
    views, heldout = split_views(folder)
    cfg = config(tmp_path, steps=30, minutes=10, checkpoint_every=10, checks=3)
    first = Phase2Trainer(model, views, cfg, heldout_views=heldout)
    first.train()
    resumed = Phase2Trainer(model, views, cfg, heldout_views=heldout)
    resumed.train(latest_checkpoint(first.checkpoint_dir))
    assert resumed.loop_seconds == first.loop_seconds and resumed.heldout.checks == first.heldout.checks


def run_train_command(argv, capsys):
    parser = argparse.ArgumentParser(prog="fdm train")
    train_command.add_arguments(parser)
    code = train_command.run(parser.parse_args(argv))
    return code, capsys.readouterr()


def test_train_command_reports_held_out_numbers(tmp_path, model, folder, monkeypatch, capsys):
    monkeypatch.setattr(train_command, "load_base_model", lambda args: model)
    common = ["--data", str(folder), "--steps", "30", "--batch-size", "8", "--crop-size", "16", "--no-progress",
              "--hidden-channels", "16", "--num-blocks", "2", "--lr", "3e-3", "--no-mask", "--checkpoint-every", "0"]
    code, out = run_train_command(common + ["--out", str(tmp_path / "a")], capsys)
    assert code == 0
    last = out.out.strip().splitlines()[-1]
    assert last.startswith("held-out (1 held-out image of folder") and "feature error ratio" in last
    assert "PSNR" in last and "dB" in last
    views = json.loads((tmp_path / "a" / "config.json").read_text())["training"]["views"]
    assert views == 9 * views_per_image_for(9)  # the recipe's views per image of the 9 training images
    # a run too short to help says so, in one line, and still saves
    code, out = run_train_command(common[:3] + ["1"] + common[4:] + ["--out", str(tmp_path / "b")], capsys)
    assert code == 0 and (tmp_path / "b" / "model.safetensors").is_file()
    assert out.err.count("does not beat plain VQ") == 1 and "train longer" in out.err
    # --val-fraction 0: nothing held out, and the summary says how to measure
    code, out = run_train_command(common + ["--out", str(tmp_path / "c"), "--val-fraction", "0"], capsys)
    assert "no images held out" in out.out
    assert "heldout" not in json.loads((tmp_path / "c" / "config.json").read_text())["training"]


def test_train_command_refuses_a_step_warmup_in_a_timed_run(tmp_path, model, folder, monkeypatch, capsys):
    monkeypatch.setattr(train_command, "load_base_model", lambda args: model)
    with pytest.raises(fdm.errors.UsageError, match="--warmup-steps counts steps"):
        run_train_command(["--data", str(folder), "--out", str(tmp_path / "x"), "--minutes", "1",
                           "--warmup-steps", "10"], capsys)


@pytest.mark.slow  # about 3 minutes on 2 cores: the default recipe caches 1160 views and trains 400 steps
def test_defaults_give_a_helpful_fdm_on_photos_from_other_sources(tmp_path, photos_dir, capsys):
    """`fdm train` with nothing but a short step budget, on the demo model and the training photos, gives an FDM
    that beats plain VQ on the held-out training photos and on the shipped photos from other sources."""
    from fdm.cli import main
    from fdm.demo.model import load_demo_vqgan
    from fdm.evaluation.comparison import evaluate_views

    out = tmp_path / "fdm-mine"
    assert main(["train", "--data", str(photos_dir / "train"), "--out", str(out), "--steps", "400",
                 "--no-progress"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("held-out (26 held-out images of folder")
    held = json.loads((out / "config.json").read_text())["training"]["heldout"]
    assert held["feature_ratio"] < 0.98 and held["psnr_gain"] > 0
    other = ImageFolderViews(EVAL_PHOTOS, crop_size=128, views_per_image=2, seed=0, scale_range=(1.0, 2.0))
    report = evaluate_views(fdm.Dequantizer(load_demo_vqgan(), fdm.FDM.from_pretrained(out)), other, extras=False,
                            progress=False)["settings"]["reconstruction"]
    assert report["feature_ratio"] < 0.98 and report["psnr"]["fdm"] > report["psnr"]["vq"]


class _Stream(fdm.training.ImageSource):
    """The images of a folder, read in order only (like a streamed dataset); counts what it reads."""

    random_access = False

    def __init__(self, folder):
        self.inner = open_source(folder)
        self.read = 0

    def __len__(self):
        return len(self.inner)

    def iter_images(self, start=0, stop=None):
        for index, image in self.inner.iter_images(start, stop):
            self.read += 1
            yield index, image

    def identity(self):
        return self.inner.identity()

    def names(self):
        return self.inner.names()

    def describe(self):
        return "a stream"


def test_image_subsets_read_their_own_images_from_indexed_and_streamed_sources(folder):
    source = open_source(folder)
    train, held = split_heldout(source, 0.3, seed=0)
    for subset in (train, held):
        got = list(subset.iter_images())
        assert [i for i, _ in got] == list(range(len(subset)))
        assert all(image.tobytes() == source.image(subset.indices[i]).tobytes() for i, image in got)
        assert [i for i, _ in subset.iter_images(1, 2)] == [1]
    stream = _Stream(folder)
    train, held = split_heldout(stream, 0.2)
    assert held.indices == [0, 1] and not held.random_access  # a stream holds out its first images
    assert [image.size for _, image in held.iter_images()] == [source.image(0).size, source.image(1).size]
    assert stream.read == 2  # ... and reads no further for them
    toy = ToyVQ().eval()
    check = HeldOutCheck(toy, fdm.find_adapter(toy), SeededViews(held, crop_size=16, views_per_image=4, seed=1),
                         hole_ratio=None)
    assert check.views == 8 and check.images == 2
    with pytest.raises(InputError, match="SeededViews"):
        HeldOutCheck(toy, fdm.find_adapter(toy), fdm.training.TensorViews(torch.zeros(2, 3, 16, 16)), hole_ratio=None)


def test_a_short_budget_gets_fewer_views(tmp_path, model, folder, monkeypatch, capsys):
    """With --minutes, the views' feature cache may take at most a quarter of the budget (measured per view)."""
    monkeypatch.setattr(train_command, "load_base_model", lambda args: model)
    seconds = {}
    measure = train_command._seconds_per_view
    monkeypatch.setattr(train_command, "_seconds_per_view", lambda *a: seconds.setdefault("v", measure(*a)))
    code, _ = run_train_command(["--data", str(folder), "--out", str(tmp_path / "t"), "--minutes", "0.05",
                                 "--crop-size", "16", "--no-progress", "--hidden-channels", "8", "--num-blocks", "1"],
                                capsys)
    views = json.loads((tmp_path / "t" / "config.json").read_text())["training"]["views"]
    assert code == 0 and seconds["v"] > 0
    assert views == 9 * views_per_image_for(9, budget_seconds=3.0, seconds_per_view=seconds["v"])
    assert views_per_image_for(9, budget_seconds=3.0, seconds_per_view=1.0) == 1  # never fewer than one
    assert views_per_image_for(9, budget_seconds=1e6, seconds_per_view=1e-3) == views_per_image_for(9)
