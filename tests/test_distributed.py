"""Data-parallel training on CPU processes (gloo): the same parameters as one process on the same
global batch, identical codebooks on every rank, and files written by rank 0 only."""

import json
import os
import subprocess
import sys

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from probvq.build import build, load_data, resolve
from probvq.config import RunConfig
from probvq.inference import fit, load_checkpoint

ARGS = [
    "--quiet", "--max-steps", "6", "--eval-every", "3", "--hidden", "8", "--res-blocks", "0",
    "--num-codes", "8", "--code-dim", "4", "--train-limit", "256", "--valid-size", "32",
    "--batch-size", "32", "--family", "vq", "--ema",
]  # fmt: skip


def test_torchrun_with_two_processes_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*launch, "-m", "probvq", "train", *ARGS, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, "-m", "probvq", "train", *ARGS, "--out", str(tmp_path / "one")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    assert len(two.stdout.strip().splitlines()) == 1  # one summary: rank 0 alone reports
    files = {run: {p.name for p in (tmp_path / run).iterdir()} for run in ("one", "two")}
    assert files["one"] == files["two"]
    a, b = load_checkpoint(tmp_path / "two" / "final.pt"), load_checkpoint(tmp_path / "one" / "final.pt")
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(a["rng"]) == 2  # every rank's random state, for resuming with two processes
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert steps == [3, 6]


def _rank(rank: int, world: int, init: str, family: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = RunConfig(
        family=family, num_codes=16, code_dim=4, hidden=8, res_blocks=0, batch_size=32,
        train_limit=256, valid_size=32, max_steps=8, eval_every=8, restart_threshold=2.0,
        quiet=True, family_settings={"ema": True} if family == "vq" else {},
    )  # fmt: skip
    dataset = load_data(config)
    config = resolve(config, dataset)
    pyro.set_rng_seed(rank)  # ranks start from different weights: DDP must broadcast rank 0's
    vae, family_ = build(config, dataset)
    prepare = vae.likelihood.prepare
    fit(vae, family_, prepare(dataset.train), prepare(dataset.valid), config)
    torch.save(vae.state_dict(), f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("family", ["vq", "sq"])
def test_every_rank_holds_the_same_model_and_codebook(tmp_path, family):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_rank, args=(2, init, family, str(tmp_path)), nprocs=2, start_method="spawn")
    states = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
    usage = states[0]["z.space.usage"]
    assert torch.isfinite(usage).all()
