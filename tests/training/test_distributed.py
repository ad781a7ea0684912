"""Training over 2 CPU processes (gloo, torch.multiprocessing spawn) against 1 process with the
whole batch: bit-identical negatives and the same update for CD-k and short-run ML, sharded
persistent ML (no shared slot or noise draw, matching statistics), checkpoints resumed on 2
ranks (bit-identical) and on 1 rank (re-sharded buffer), and a torchrun job with one rank killed
mid-run resumed to the uninterrupted run's end."""

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ebm_fast import LangevinSampler, ReplayBuffer
from ebm_fast.training import (
    ContrastiveDivergence,
    PersistentML,
    ShortRunML,
    Trainer,
    checkpoints,
    distributed,
)

GLOBAL_BATCH = 16
CAPACITY = 64
RANKS = 2


def data():
    return torch.randn(128, 2, generator=torch.Generator().manual_seed(4))


def make_trainer(kind, out_dir=None, iterations_logged=1):
    """A tiny run of the given loss kind, built the same way in one process and on each rank
    (distributed.wrap and shard_buffer are the identity / a whole buffer in one process)."""
    torch.manual_seed(0)
    energy = distributed.wrap(nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1)))
    sampler = LangevinSampler(
        energy, step_size=0.01, noise_scale=0.1, n_steps=4, clamp=(-3, 3), seed=1
    )
    if kind == "cd":
        loss = ContrastiveDivergence(sampler, k=4, alpha=0.1)
    elif kind == "short_run":
        loss = ShortRunML(sampler, lambda n: torch.rand(n, 2) * 6 - 3, alpha=0.1)
    else:
        loss = PersistentML(
            sampler,
            distributed.shard_buffer(CAPACITY, (2,), init_range=(-3, 3), seed=2, reinit_prob=0.2),
            alpha=0.1,
        )
    optimizer = torch.optim.SGD(energy.parameters(), lr=0.05)
    return Trainer(
        energy,
        loss,
        optimizer,
        out_dir=out_dir,
        progress=False,
        data_seed=3,
        log_every=iterations_logged,
        checkpoint_every=3,
    )


def run(kind, iterations, out_dir=None, resume=None):
    """Train to `iterations` (resuming from a checkpoint when given); the last negatives, the
    parameters, the metrics and the loss state."""
    trainer = make_trainer(kind, out_dir)
    if resume is not None:
        trainer.load_checkpoint(resume)
    trainer.fit(data(), iterations, GLOBAL_BATCH)
    return {
        "negatives": trainer.loss.last.negatives,
        "parameters": [p.detach().clone() for p in trainer.parameters],
        "history": trainer.history,
        "loss": trainer.loss.state_dict(),
    }


def _rank_main(rank, port, tmp):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(RANKS),
    )
    torch.set_num_threads(1)
    distributed.init("gloo")
    results = {kind: run(kind, 2) for kind in ("cd", "short_run")}
    results["persistent"] = run("persistent", 30)
    results["straight"] = run("persistent", 6)
    run("persistent", 3, out_dir=f"{tmp}/run")
    results["resumed"] = run(
        "persistent", 6, out_dir=f"{tmp}/run", resume=f"{tmp}/run/checkpoint.pt"
    )
    run("persistent", 3, out_dir=f"{tmp}/for_one_rank")
    torch.save(results, f"{tmp}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(tmp)), nprocs=RANKS, start_method="spawn")
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]


@pytest.mark.parametrize("kind", ["cd", "short_run"])
def test_split_batch_gives_the_single_process_negatives_and_update(two_ranks, kind):
    _, ranks = two_ranks
    single = run(kind, 2)
    assert torch.equal(torch.cat([r[kind]["negatives"] for r in ranks]), single["negatives"])
    for rank in ranks:
        for split, whole in zip(rank[kind]["parameters"], single["parameters"]):
            torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    # Metrics are averaged over the ranks: the global batch's.
    torch.testing.assert_close(
        ranks[0][kind]["history"][-1]["energy_neg"],
        single["history"][-1]["energy_neg"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_shards_share_no_slot_or_noise_and_match_single_process_statistics(two_ranks):
    _, ranks = two_ranks
    shards = [r["persistent"]["loss"]["buffer"] for r in ranks]
    assert [s["config"]["capacity"] for s in shards] == [CAPACITY // RANKS] * RANKS
    assert [s["config"]["rank"] for s in shards] == list(range(RANKS))
    # A noise draw shared by the ranks would store the same row in both shards.
    written = torch.cat([s["written"] for s in shards]).bool()
    stored = torch.cat([s["storage"] for s in shards])[written]
    assert torch.unique(stored, dim=0).shape[0] == stored.shape[0]
    single = run("persistent", 30)
    # Slot coverage: 30 draws of 16 from 64 slots cover nearly all of them, sharded or not.
    assert abs(written.float().mean() - single["loss"]["buffer"]["written"].float().mean()) <= 0.1
    # The records hold the fraction averaged over the ranks, the same on each.
    reinit = torch.tensor([h["reinit_fraction"] for h in ranks[0]["persistent"]["history"]])
    assert reinit.tolist() == [h["reinit_fraction"] for h in ranks[1]["persistent"]["history"]]
    single_reinit = torch.tensor([h["reinit_fraction"] for h in single["history"]])
    # The first draws are all fresh (unwritten slots), in both runs.
    assert reinit[0] == single_reinit[0] == 1.0
    # Late iterations: the unwritten slots are gone, the fraction is reinit_prob = 0.2.
    assert abs(reinit[10:].mean() - 0.2) < 0.08
    assert abs(single_reinit[10:].mean() - 0.2) < 0.08


def test_checkpoint_resumed_on_two_ranks_continues_bit_identically(two_ranks):
    _, ranks = two_ranks
    for rank in ranks:
        for resumed, straight in zip(rank["resumed"]["parameters"], rank["straight"]["parameters"]):
            assert torch.equal(resumed, straight)
        assert torch.equal(rank["resumed"]["negatives"], rank["straight"]["negatives"])
        for key in ("storage", "written", "draws"):
            assert torch.equal(
                rank["resumed"]["loss"]["buffer"][key], rank["straight"]["loss"]["buffer"][key]
            )


def test_checkpoint_resumed_on_one_rank_reassembles_the_buffer(two_ranks):
    tmp, _ = two_ranks
    checkpoint = tmp / "for_one_rank" / "checkpoint.pt"
    shards = [
        torch.load(distributed.shard_path(checkpoint, 3, r, RANKS))["buffer"] for r in range(RANKS)
    ]
    trainer = make_trainer("persistent")
    trainer.load_checkpoint(checkpoint)
    buffer = trainer.loss.buffer.state_dict()
    assert buffer["config"]["capacity"] == CAPACITY and buffer["config"]["rank"] == 0
    assert torch.equal(buffer["storage"], torch.cat([s["storage"] for s in shards]))
    assert torch.equal(buffer["written"], torch.cat([s["written"] for s in shards]))
    assert trainer.iteration == 3
    trainer.fit(data(), 5, GLOBAL_BATCH)  # continues (other slot draws, same sampler noise)
    assert trainer.iteration == 5 and all(p.isfinite().all() for p in trainer.parameters)


def test_resuming_on_one_process_leaves_no_shard_files_behind(two_ranks, tmp_path):
    tmp, _ = two_ranks
    run_dir = shutil.copytree(tmp / "for_one_rank", tmp_path / "run")
    trainer = make_trainer("persistent", out_dir=run_dir)
    trainer.load_checkpoint(run_dir / "checkpoint.pt")
    trainer.fit(data(), 5, GLOBAL_BATCH)
    # The loss state is in checkpoint.pt now: the 2-process shards are stale.
    assert "loss_shards" not in checkpoints.load(run_dir / "checkpoint.pt")
    assert not (run_dir / "checkpoint.shards").exists()


def test_stale_shards_are_removed_by_one_rank_each(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    folder = distributed.shard_path(checkpoint, 0, 0, 1).parent
    folder.mkdir()
    names = [
        f"iteration-{i}-rank-{r}-of-{w}.pt"
        for i, r, w in [(6, 0, 2), (6, 1, 2), (4, 0, 2), (4, 1, 2), (2, 0, 3), (2, 1, 3), (2, 2, 3)]
    ]
    names += [".iteration-8-rank-1-of-2.pt.k1ll3d.tmp", "notes.txt"]
    for name in names:
        (folder / name).write_text("")
    # Resumed on 2 processes from the 3-process checkpoint, now at iteration 6.
    for rank in range(2):
        distributed.remove_stale_shards(
            checkpoint, rank, 2, keep=distributed.shard_path(checkpoint, 6, rank, 2)
        )
    assert sorted(p.name for p in folder.iterdir()) == [
        "iteration-6-rank-0-of-2.pt",
        "iteration-6-rank-1-of-2.pt",
        "notes.txt",
    ]
    distributed.remove_stale_shards(checkpoint, 0, 1)  # then on one process
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_reshard_buffer_splits_each_class_between_ranks():
    torch.manual_seed(0)
    whole = ReplayBuffer(8, (1,), n_classes=2, seed=5)
    whole.push(torch.arange(8.0)[:, None], y=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    halves = [distributed.reshard_buffer_state([whole.state_dict()], r, 2) for r in range(2)]
    assert [h["storage"].flatten().tolist() for h in halves] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [h["count"].tolist() for h in halves] == [[2, 2], [2, 2]]
    back = distributed.reshard_buffer_state(halves, 0, 1)
    assert torch.equal(back["storage"], whole.state_dict()["storage"])
    ReplayBuffer(4, (1,), n_classes=2, seed=5, rank=1).load_state_dict(halves[1])


def test_uneven_global_batch_is_refused():
    with pytest.raises(ValueError, match="multiple of the world size"):
        distributed.local_batch(torch.zeros(5, 2), None, 0, 2)


def test_cli_trains_on_two_processes(tmp_path, capsys):
    from ebm_fast import cli

    out = tmp_path / "run"
    options = [
        "train",
        "--data",
        "ring",
        "--steps",
        "2",
        "--batch",
        "16",
        "--buffer-size",
        "64",
        "--n-data",
        "500",
        "--log-every",
        "2",
        "--checkpoint-every",
        "2",
        "--plot-every",
        "100",
        "--iterations",
        "2",
    ]
    assert cli.main(options + ["--nproc", "3", "--out", str(tmp_path / "odd")]) == 2
    assert "multiples of --nproc 3" in capsys.readouterr().err
    assert cli.main(options + ["--nproc", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "checkpoint.shards").iterdir()) == [
        "iteration-2-rank-0-of-2.pt",
        "iteration-2-rank-1-of-2.pt",
    ]
    assert torch.load(out / "checkpoint.pt")["loss_shards"] == 2


def _marked_pids(marker: str, *entries: str) -> list[int]:
    """The pids of the processes whose environment holds marker (and each entry, e.g. RANK=1),
    read from /proc: the test's own torchrun and ranks only."""
    wanted = {f"KILL_TEST_MARKER={marker}".encode(), *(e.encode() for e in entries)}
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if wanted <= set(environ.read_bytes().split(b"\0")):
                pids.append(int(environ.parent.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def test_killing_one_rank_mid_run_then_resuming_matches_the_uninterrupted_run(
    tmp_path, monkeypatch, capfd
):
    """SIGKILL rank 1 of `ebm-fast train --nproc 2` while it checkpoints every 2 iterations:
    torchrun ends the job, checkpoint.pt is the last complete checkpoint (its shards on disk),
    and resuming it on 2 ranks ends with the parameters and buffer shards of a run that never
    stopped."""
    from ebm_fast import cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("KILL_TEST_MARKER", str(tmp_path))  # torchrun passes it to the ranks
    options = [
        "train",
        "--data",
        "ring",
        "--steps",
        "2",
        "--batch",
        "16",
        "--buffer-size",
        "64",
        "--n-data",
        "500",
        "--log-every",
        "1000",
        "--checkpoint-every",
        "2",
        "--plot-every",
        "1000",
        "--nproc",
        "2",
    ]
    killed = tmp_path / "killed"
    exit_codes = []
    job = threading.Thread(
        target=lambda: exit_codes.append(
            cli.main(options + ["--iterations", "100000", "--out", str(killed)])
        ),
        daemon=True,
    )
    job.start()
    try:
        deadline = time.monotonic() + 60
        while not (killed / "checkpoint.pt").exists():
            assert job.is_alive() and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.02)
        (rank_1,) = _marked_pids(str(tmp_path), "RANK=1")
        os.kill(rank_1, signal.SIGKILL)
        job.join(timeout=60)
    finally:  # never leave the 100,000-iteration job running past a failed test
        if job.is_alive():
            for pid in _marked_pids(str(tmp_path)):
                os.kill(pid, signal.SIGKILL)
            job.join(timeout=30)
    assert exit_codes and exit_codes[0] != 0  # torchrun stopped rank 0 and reports the failure
    saved = checkpoints.load(killed / "checkpoint.pt")
    iteration = saved["iteration"]
    assert iteration % 2 == 0 and saved["loss_shards"] == RANKS
    target = iteration + 5
    # What a rank killed in the middle of writing its next shard leaves (the kill above lands
    # there only by chance): atomic_save's temporary file, half written.
    shards_dir = killed / "checkpoint.shards"
    (shards_dir / f".iteration-{iteration + 2}-rank-1-of-2.pt.k1ll3d.tmp").write_bytes(
        (shards_dir / f"iteration-{iteration}-rank-1-of-2.pt").read_bytes()[:100]
    )
    capfd.readouterr()
    assert (
        cli.main(["train", "--resume", str(killed), "--nproc", "2", "--iterations", str(target)])
        == 0
    )
    assert f"resuming {killed} at iteration {iteration}" in capfd.readouterr().out
    straight = tmp_path / "straight"
    assert cli.main(options + ["--iterations", str(target), "--out", str(straight)]) == 0
    ends = [checkpoints.load(run / "checkpoint.pt") for run in (killed, straight)]
    assert ends[0]["iteration"] == ends[1]["iteration"] == target
    for name, tensor in ends[1]["model"].items():
        assert torch.equal(ends[0]["model"][name], tensor), name
    for rank in range(RANKS):
        shards = [
            checkpoints.load(distributed.shard_path(run / "checkpoint.pt", target, rank, RANKS))[
                "buffer"
            ]
            for run in (killed, straight)
        ]
        for key in ("storage", "written", "draws"):
            assert torch.equal(shards[0][key], shards[1][key]), (rank, key)
    # The resumed run's checkpoints removed the files the killed job left behind.
    assert sorted(p.name for p in shards_dir.iterdir()) == [
        f"iteration-{target}-rank-{rank}-of-2.pt" for rank in range(RANKS)
    ]
