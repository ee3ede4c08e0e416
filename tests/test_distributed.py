"""Phase-2 and phase-3 trainers under ``torchrun --nproc_per_node 2`` and ``accelerate launch`` (2 CPU processes,
gloo backend) on the tiny ToyVQ model: every rank must end with the same weights, and only rank 0 writes. Under
``torchrun --nnodes 2`` (two "nodes" on this machine), phase 2 on a 2-shard disk cache ends with the weights of
one process reading both shards with the same global batch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent

# Phase 2 then phase 3 (the whole recipe), each rank saving what it ends with.
SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    sys.path.insert(0, {tests!r})
    import fdm
    from fdm.training.data import TensorViews
    from fdm.training.distributed import shutdown_distributed
    from fdm.training.phase2 import Phase2Config, Phase2Trainer
    from fdm.training.phase3 import Phase3Config, Phase3Trainer
    from toy_vq import ToyVQ

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model = ToyVQ().eval()
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 2 - 1, size=(32, 32), mode="bilinear")
    views = TensorViews(images)

    phase2 = Phase2Config(steps=3, batch_size=2, warmup_steps=1, hidden_channels=16, num_blocks=2, progress=False,
                          log_every=1, checkpoint_every=0, output_dir=os.path.join(out, "phase2"))
    module = Phase2Trainer(model, views, phase2).train()
    save_file({{k: v.contiguous() for k, v in module.state_dict().items()}}, os.path.join(out, f"phase2-rank{{rank}}.safetensors"))

    phase3 = Phase3Config(steps=3, batch_size=2, warmup_steps=1, disc_warmup_steps=1, disc_channels=8, drop_vgg_terms=True,
                          start_steps={{"gradient": 0, "adversarial": 1}}, progress=False, log_every=1, val_every=0,
                          checkpoint_every=2, output_dir=os.path.join(out, "phase3"))
    trainer = Phase3Trainer(model, module, views, phase3)
    trainer.train()
    weights = {{f"{{name}}.{{k}}": v.detach().clone().contiguous() for name, m in trainer.checkpoint_modules().items()
               for k, v in m.state_dict().items()}}
    save_file(weights, os.path.join(out, f"phase3-rank{{rank}}.safetensors"))
    print(f"rank {{rank}} of {{os.environ['WORLD_SIZE']}} done", flush=True)
    shutdown_distributed()
    """
)


# Phase 2 on a sharded disk cache: each process encodes and reads its own shard; rank 0 saves the FDM.
SHARDED_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from fdm.training.distributed import shutdown_distributed
    from fdm.training.phase2 import Phase2Trainer
    from test_distributed import sharded_run

    config, model, views = sharded_run(sys.argv[1], batch_size=2)
    Phase2Trainer(model, views, config).train()
    print(f"rank {{os.environ['RANK']}} of {{os.environ['WORLD_SIZE']}} done", flush=True)
    shutdown_distributed()
    """
)


def sharded_run(out: str, batch_size: int):
    """The phase-2 run of the multi-node test: its config (2 cache shards on disk, per-process ``batch_size``),
    the toy model and the views."""
    from fdm.training.data import TensorViews
    from fdm.training.phase2 import Phase2Config
    from toy_vq import ToyVQ

    torch.manual_seed(0)
    model = ToyVQ().eval()
    g = torch.Generator().manual_seed(1)
    images = torch.nn.functional.interpolate(torch.rand(12, 3, 4, 4, generator=g) * 2 - 1, size=(32, 32),
                                             mode="bilinear")
    config = Phase2Config(steps=5, batch_size=batch_size, warmup_steps=1, hidden_channels=16, num_blocks=2,
                          progress=False, checkpoint_every=0, cache="disk", cache_shards=2, output_dir=out)
    return config, model, TensorViews(images)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "rank 0 of 2 done" in proc.stdout and "rank 1 of 2 done" in proc.stdout, proc.stdout


def check_ranks_agree(out: Path) -> None:
    for phase in ("phase2", "phase3"):
        rank0, rank1 = (load_file(str(out / f"{phase}-rank{r}.safetensors")) for r in (0, 1))
        assert rank0.keys() == rank1.keys()
        different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
        assert not different, f"{phase}: ranks disagree on {different}"
    phase3 = load_file(str(out / "phase3-rank0.safetensors"))
    assert any(k.startswith("discriminator.") for k in phase3)
    # rank 0 wrote the results and the checkpoint, once
    assert (out / "phase2" / "model.safetensors").is_file()
    assert {p.name for p in (out / "phase3" / "fdm").iterdir()} >= {"model.safetensors", "decoder.safetensors"}
    assert sorted(p.name for p in (out / "phase3" / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def write_script(tmp_path: Path) -> Path:
    script = tmp_path / "train_both.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    return script


def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    script = write_script(tmp_path)
    out = tmp_path / "out"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), str(out)], tmp_path)
    check_ranks_agree(out)


@pytest.mark.slow
def test_accelerate_launch_two_processes_end_with_identical_weights(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate is not installed (pip install \".[dist]\")")
    script = write_script(tmp_path)
    out = tmp_path / "out"
    # --multi_gpu selects accelerate's torchrun-based launcher; the trainers pick gloo for the CPU model
    run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script), str(out)], tmp_path)
    check_ranks_agree(out)


@pytest.mark.slow
def test_two_nodes_on_a_sharded_cache_match_one_process(tmp_path):
    from fdm.training.phase2 import Phase2Trainer

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT.format(tests=str(TESTS)))
    out = tmp_path / "two-nodes"
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               str(script), str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    logs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "rank 0 of 2 done" in logs[0] and "rank 1 of 2 done" in logs[1]
    (cache,) = (out / "feature-cache").iterdir()
    assert sorted(p.name for p in cache.iterdir()) == ["shard-00000-of-00002", "shard-00001-of-00002"]

    config, model, views = sharded_run(str(tmp_path / "one-process"), batch_size=4)  # the same global batch
    single = Phase2Trainer(model, views, config)
    single.train()
    assert single.cache_fill_seconds > 0
    two = load_file(str(out / "model.safetensors"))
    one = {k: v for k, v in single.fdm.state_dict().items()}
    assert two.keys() == one.keys()
    # the same batches, masks and averaged gradients: equal up to float summation order
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in one.items() if k.startswith("head"))
