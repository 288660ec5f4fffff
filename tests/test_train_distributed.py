"""Data parallelism: two processes (gloo on the CPU) train exactly what one process trains.

One spawn of two ranks (``torch.multiprocessing``, with the environment torchrun gives them) runs
every scenario of ``two_process_runs`` in turn — importing torch and transformers costs seconds per
process, so the scenarios share it; the tests then compare what the ranks wrote with one-process
runs in the test process:

- SFT (token-mean loss, micro-batches of 3 + 2 per rank), RM, DPO (reference log-probs split
  across the ranks) and KTO (z0 over both ranks): the weights after a few steps equal the
  one-process run's (float32, ≤ 1e-5), and so do the logged losses and accuracies;
- FSDP2 on the CPU: a sharded SFT run's full-state checkpoint loads with plain transformers and
  resumes on one process to the one-process run's weights; a sharded reward model trains what one
  process trains; PPO saves and resumes its sharded policy and critic;
- PPO (DDP) and GRPO (FSDP2) write one metrics file and one checkpoint, resume exactly on two
  processes, and resume on one process from a two-process checkpoint; online DPO runs, also when
  one rank's judge labels no pair (that rank joins every step with a weight-0 pair);
- the global whitening equals one process's whitening of the concatenated batch;
- the divergence guard stops both ranks with the same message; a batch without equal shares is a
  clear error;
- RLOO through the real command line: ``torchrun --standalone --nproc_per_node 2 -m minirlhf``.
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from minirlhf.core.masked import masked_whiten
from minirlhf.data.order import BatchSchedule
from minirlhf.errors import MinirlhfError, TrainingDiverged
from minirlhf.models.reward_model import RewardModel
from minirlhf.models.value_model import ValueModel
from minirlhf.train import sft as sft_module
from minirlhf.train.checkpoints import latest_checkpoint
from minirlhf.train.distributed import data_parallel_weights, gather_objects, global_masked_whiten, pad_micro_batches, rank
from minirlhf.train.dpo import DPOArgs, train_dpo
from minirlhf.train.grpo import GRPOArgs, train_grpo
from minirlhf.train.metrics import read_metrics
from minirlhf.train.online_dpo import OnlineDPOArgs, train_online_dpo
from minirlhf.train.ppo import PPOArgs, train_ppo
from minirlhf.train.rewards import register_reward
from minirlhf.train.rm import RMArgs, train_rm
from minirlhf.train.sft import SFTArgs, train_sft

FAST = dict(progress=False, tensorboard=False, seed=0, max_len=64, warmup_ratio=0.0, lr_schedule="constant")
ONLINE = dict(progress=False, tensorboard=False, seed=0, template="prompt", reward="gold", max_new_tokens=6)
TRAIN = {SFTArgs: train_sft, RMArgs: train_rm, DPOArgs: train_dpo}


def offline_args(toy, out, algo):
    """The offline runs both sides train: batches of 10 (SFT), 6 and 8 in micro-batches of 3 or 2,
    so each rank's share splits unevenly (SFT: 3 + 2 examples, with different token counts)."""
    data, common = toy["data"], dict(model=toy["model"], out=str(out / algo), **FAST)
    return {
        "sft": lambda: SFTArgs(data=str(data.sft_train), batch_size=10, micro_batch_size=3, epochs=1, lr=5e-3, **common),
        "rm": lambda: RMArgs(data=str(data.pref_train), eval_data=str(data.pref_test), batch_size=6, micro_batch_size=2,
                             stop_at_step=3, eval_every=2, lr=3e-3, **common),
        "dpo": lambda: DPOArgs(data=str(data.pref_train), eval_data=str(data.pref_test), batch_size=6,
                               micro_batch_size=2, stop_at_step=3, eval_every=2, lr=1e-3, beta=0.5, **common),
        "kto": lambda: DPOArgs(data=str(data.kto_train), template="kto", loss="kto", batch_size=8, micro_batch_size=3,
                               stop_at_step=2, lr=1e-2, **common),
    }[algo]()


def online_args(toy, out, algo, **kw):
    """PPO on DDP (minibatches, adaptive β, whitening, the ptx term: two forward passes of the policy
    before one backward), GRPO on FSDP2 (two epochs of minibatches)."""
    common = dict(model=toy["model"], data=str(toy["data"].prompts), out=str(out), steps=2, **ONLINE, **kw)
    if algo == "ppo":
        return PPOArgs(batch_size=4, minibatch_size=2, adaptive_kl=True, ptx_coef=0.1, ptx_data=str(toy["data"].sft_train),
                       **common)
    return GRPOArgs(batch_size=2, group_size=2, minibatch_size=2, ppo_epochs=2, fsdp=True, **common)


original_sft_loss = sft_module.sft_loss


def sft_loss_nan_on_rank_1(model, batch):
    """``sft_loss``, NaN in rank 1's 4th call: its second micro-batch of optimizer step 1."""
    sft_loss_nan_on_rank_1.calls += 1
    loss, metrics = original_sft_loss(model, batch)
    return (loss * float("nan") if rank() == 1 and sft_loss_nan_on_rank_1.calls == 4 else loss), metrics


def two_process_runs(toy, out):
    """What each of the two ranks runs; the tests read what they wrote in ``out``."""
    for algo in ("sft", "rm", "dpo", "kto"):
        args = offline_args(toy, out, algo)
        TRAIN[type(args)](args)
    sharded = offline_args(toy, out / "fsdp", "sft")
    sharded.fsdp, sharded.stop_at_step = True, 2
    train_sft(sharded)
    sharded = offline_args(toy, out / "fsdp", "rm")
    sharded.fsdp = True
    train_rm(sharded)
    for algo, train in (("ppo", train_ppo), ("grpo", train_grpo)):
        train(online_args(toy, out / f"{algo}-straight", algo))
        train(online_args(toy, out / f"{algo}-cut", algo, stop_at_step=1))
        if rank() == 0:  # the interrupted run, for one process to resume
            shutil.copytree(out / f"{algo}-cut", out / f"{algo}-cut-copy")
        train(online_args(toy, out / f"{algo}-cut", algo, resume=True))
    train_ppo(online_args(toy, out / "ppo-fsdp", "ppo", fsdp=True, stop_at_step=1))  # the critic's shards too
    train_ppo(online_args(toy, out / "ppo-fsdp", "ppo", fsdp=True, resume=True))
    train_online_dpo(OnlineDPOArgs(model=toy["model"], data=str(toy["data"].prompts), out=str(out / "online-dpo"),
                                   steps=2, batch_size=4, micro_batch_size=1, **ONLINE))
    # Online DPO where rank 1's judge ties every pair: rank 1 joins each step with a weight-0 pair
    # (FSDP: its all-gathers must pair up with rank 0's).
    register_reward("ties_on_rank_1")(lambda prompts, responses, answers: [
        0.0 if rank() == 1 else float(i) for i in range(len(responses))])
    train_online_dpo(OnlineDPOArgs(model=toy["model"], data=str(toy["data"].prompts), out=str(out / "online-dpo-ties"),
                                   steps=2, batch_size=4, micro_batch_size=1, fsdp=True,
                                   **{**ONLINE, "reward": "ties_on_rank_1"}))
    micro = pad_micro_batches([([1], "a"), ([2, 3], "b")] if rank() == 0 else [], ([], "placeholder"))
    (out / f"padded-{rank()}.json").write_text(json.dumps([[ids for ids, _ in micro],
                                                           data_parallel_weights([len(ids) for ids, _ in micro])]))
    try:  # a batch of 5 has no equal shares
        train_sft(SFTArgs(model=toy["model"], data=str(toy["data"].sft_train), out=str(out / "uneven"), batch_size=5,
                          **FAST))
    except MinirlhfError as error:
        (out / f"uneven-{rank()}.txt").write_text(str(error))
    # Whitening: the ranks hold different numbers of rows and of valid tokens.
    g = torch.Generator().manual_seed(rank())
    x, mask = torch.randn(3 + rank(), 5, generator=g), torch.rand(3 + rank(), 5, generator=g) > 0.3
    torch.save(gather_objects((x, mask, global_masked_whiten(x, mask))), out / f"whiten-{rank()}.pt")
    # The divergence guard: a NaN loss on rank 1 only.
    sft_module.sft_loss, sft_loss_nan_on_rank_1.calls = sft_loss_nan_on_rank_1, 0
    try:
        train_sft(offline_args(toy, out / "nan", "sft"))
    except TrainingDiverged as error:
        (out / f"nan-{rank()}.txt").write_text(str(error))
    finally:
        sft_module.sft_loss = original_sft_loss


def rank_main(local_rank, port, toy, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    two_process_runs(toy, out)
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(toy, tmp_path_factory):
    """The directory of everything ``two_process_runs`` wrote on two ranks."""
    out = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(rank_main, args=(free_port(), toy, out), nprocs=2)
    return out


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def policy_weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["sft", "rm", "dpo", "kto"])
def test_two_processes_train_what_one_process_trains(algo, two_ranks, toy, tmp_path):
    args = offline_args(toy, tmp_path, algo)
    one, two = TRAIN[type(args)](args), latest_checkpoint(two_ranks / algo)
    load = (lambda p: RewardModel.from_pretrained(p).state_dict()) if algo == "rm" else policy_weights
    difference = max_difference(load(one), load(two))
    print(f"{algo}: 2 processes vs 1, max |Δweight| = {difference:.1e}")
    assert difference <= 1e-5, f"{algo}: weights differ by {difference:.2e}"
    splits = ["train", "eval"] if algo in ("rm", "dpo") else ["train"]  # evaluated at steps 0 and 2
    for split in splits:
        rows_one, rows_two = read_metrics(args.out, split), read_metrics(two_ranks / algo, split)
        assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] and len(rows_one) >= 2
        for a, b in zip(rows_one, rows_two):
            for name in ("loss", "accuracy", "grad_norm"):
                if name in a:
                    assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (algo, split, name)


def test_fsdp_reward_model_trains_what_one_process_trains(two_ranks, toy, tmp_path):
    one = train_rm(offline_args(toy, tmp_path, "rm"))
    two = latest_checkpoint(two_ranks / "fsdp" / "rm")
    difference = max_difference(RewardModel.from_pretrained(one).state_dict(), RewardModel.from_pretrained(two).state_dict())
    print(f"rm (FSDP): 2 processes vs 1, max |Δweight| = {difference:.1e}")
    assert difference <= 1e-5, difference


def test_fsdp_ppo_saves_and_resumes_policy_and_critic(two_ranks):
    run = two_ranks / "ppo-fsdp"
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    state = torch.load(latest_checkpoint(run) / "training_state.pt", weights_only=False)
    critic = ValueModel.from_pretrained(run / "critic").state_dict()
    assert {k: v.shape for k, v in state["extra"]["critic"].items()} == {k: v.shape for k, v in critic.items()}
    AutoModelForCausalLM.from_pretrained(run / "final")


def test_fsdp_checkpoint_loads_and_resumes_on_one_process(two_ranks, toy, tmp_path):
    one = train_sft(offline_args(toy, tmp_path / "one", "sft"))
    sharded = two_ranks / "fsdp" / "sft"
    checkpoint = latest_checkpoint(sharded)
    assert checkpoint.name == "step-000002"
    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)  # whole weights, not a rank's shard
    params = [p for p in model.parameters()]
    moments = [state["optimizer"]["state"][i]["exp_avg"] for i in range(len(params))]
    assert [m.shape for m in moments] == [p.shape for p in params]  # whole AdamW moments too
    assert len(state["rng_per_rank"]) == 2
    shutil.copytree(sharded, tmp_path / "resumed")
    resumed = offline_args(toy, tmp_path, "sft")
    resumed.out, resumed.resume = str(tmp_path / "resumed"), True
    difference = max_difference(policy_weights(one), policy_weights(train_sft(resumed)))
    print(f"sft (FSDP, resumed on 1 process): max |Δweight| = {difference:.1e}")
    assert difference <= 1e-5, difference


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_online_runs_write_once_and_resume_on_two_or_one_processes(algo, two_ranks, toy):
    straight, cut = two_ranks / f"{algo}-straight", two_ranks / f"{algo}-cut"
    assert sorted(p.name for p in straight.iterdir()) == sorted(
        ["args.json", "checkpoints", "final", "train.csv"] + (["critic"] if algo == "ppo" else []))
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["latest", "step-000002"]
    rows = read_metrics(straight)
    assert [r["step"] for r in rows] == [1, 2] and {"reward", "gold", "kl"} <= set(rows[0])
    # Two processes resume exactly: per-rank RNG states, AdamW state (GRPO: gathered from FSDP shards).
    assert max_difference(policy_weights(straight / "final"), policy_weights(cut / "final")) == 0
    assert read_metrics(cut) == rows
    # One process continues a two-process run (its own rollouts from step 1 on).
    train = {"ppo": train_ppo, "grpo": train_grpo}[algo]
    final = train(online_args(toy, two_ranks / f"{algo}-cut-copy", algo, resume=True))
    assert [r["step"] for r in read_metrics(final.parent)] == [1, 2]
    assert read_metrics(final.parent)[0] == rows[0]


def test_online_dpo_runs_on_two_processes(two_ranks):
    rows = read_metrics(two_ranks / "online-dpo")
    assert [r["step"] for r in rows] == [1, 2] and {"labelled_fraction", "kl", "gold"} <= set(rows[0])
    AutoModelForCausalLM.from_pretrained(two_ranks / "online-dpo" / "final")


def test_a_rank_without_data_joins_with_weight_zero(two_ranks):
    assert json.loads((two_ranks / "padded-0.json").read_text()) == [[[1], [2, 3]], [2 * 1 / 3, 2 * 2 / 3]]
    assert json.loads((two_ranks / "padded-1.json").read_text()) == [[[], []], [0.0, 0.0]]
    rows = read_metrics(two_ranks / "online-dpo-ties")  # rank 1 labelled nothing, rank 0 all its pairs
    assert [r["step"] for r in rows] == [1, 2] and all(r["labelled_fraction"] == 0.5 for r in rows)
    assert all(math.isfinite(v) for r in rows for v in r.values()) and "judge_margin" in rows[0]


def test_global_whitening_is_the_whitening_of_the_concatenated_batch(two_ranks):
    parts = torch.load(two_ranks / "whiten-0.pt")
    x, mask, whitened = (torch.cat([part[i] for part in parts]) for i in range(3))
    assert x.shape == (7, 5)
    print(f"whitening: max |Δ| = {float((whitened - masked_whiten(x, mask)).abs().max()):.1e}")
    torch.testing.assert_close(whitened, masked_whiten(x, mask), rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.load(two_ranks / "whiten-1.pt")[1][2], parts[1][2])


def test_divergence_guard_stops_both_ranks_with_the_same_message(two_ranks):
    messages = [(two_ranks / f"nan-{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1]
    batch = BatchSchedule(48, 10, 1, seed=0).batch(1)  # rank 1 holds batch[5:10], in micro-batches 3 + 2
    assert f"the loss is nan on rank 1 at optimizer step 1 (0-based); batch example ids {batch[8:]}" in messages[0]
    checkpoint = latest_checkpoint(two_ranks / "nan" / "sft")
    assert checkpoint.name == "step-000001" and str(checkpoint) in messages[0]


def test_a_batch_without_equal_shares_is_a_clear_error(two_ranks):
    for r in (0, 1):
        message = (two_ranks / f"uneven-{r}.txt").read_text()
        assert message == "--batch-size 5 cannot be split evenly across 2 processes: make it a multiple of 2"


def test_torchrun_command_line(toy, tmp_path):
    out = tmp_path / "rloo"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "minirlhf", "rloo", "--model", toy["model"], "--data", str(toy["data"].prompts),
               "--template", "prompt", "--reward", "gold", "--steps", "2", "--batch-size", "2", "--group-size", "2",
               "--max-new-tokens", "6", "--out", str(out), "--no-progress", "--no-tensorboard"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"saved {out / 'final'}") == 2  # every rank returns the path
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    AutoModelForCausalLM.from_pretrained(out / "final")
