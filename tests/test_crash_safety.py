"""A crash at any moment is survivable: each promise of DEVELOPERS.md's "Crash safety" list.

A crash is simulated the two ways a real one leaves its traces: an exception raised inside a
write (what a full disk or a bug does; the writer's own clean-up runs), and the files a killed
process leaves (``kill -9``: truncated files, temporaries named after a process that is gone).
The runs are SFT and DPO on the tiny Qwen2-shaped checkpoint, a few steps each.
"""
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fixtures import write_jsonl
from minirlhf.data.atomic import remove_stale_temporaries, write_dir_atomic
from minirlhf.errors import MinirlhfError
from minirlhf.train.checkpoints import checkpoint_problem, latest_checkpoint
from minirlhf.train.dpo import DPOArgs, train_dpo
from minirlhf.train.metrics import read_metrics
from minirlhf.train.sft import SFTArgs, train_sft

HOST = socket.gethostname()
FAST = dict(progress=False, tensorboard=False, seed=0, max_len=48, warmup_ratio=0.0, lr_schedule="constant")
SFT = dict(epochs=2, lr=1e-2, batch_size=4, eval_every=2, **FAST)  # 4 examples per step: 8 steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from minirlhf.toy.corpus import CorpusSizes, build_corpus

    root = tmp_path_factory.mktemp("data")
    corpus = build_corpus(0, root, CorpusSizes(pref_train=16, pref_test=8, pku_train=4, sft_train=16, sft_test=8,
                                               kto_train=4, prompts=4, eval_prompts=4))
    return corpus


def sft(qwen2_checkpoint, data, out, **kwargs):
    args = SFTArgs(model=str(qwen2_checkpoint), data=str(data.sft_train), eval_data=str(data.sft_test), out=str(out),
                   **{**SFT, **kwargs})
    return Path(train_sft(args))


def same_weights(a, b):
    a, b = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def dead_pid():
    """The id of a process that has exited (what a killed writer's temporaries are named after)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def straight(qwen2_checkpoint, data, tmp_path_factory):
    """An uninterrupted SFT run: what every interrupted-and-resumed run below must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return {"final": sft(qwen2_checkpoint, data, out), "train": read_metrics(out), "eval": read_metrics(out, "eval")}


def assert_same_as_straight(out, final, straight):
    assert same_weights(final, straight["final"])
    assert read_metrics(out) == straight["train"] and read_metrics(out, "eval") == straight["eval"]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate model.safetensors", "truncate training_state.pt",
                                    "delete training_state.pt", "truncate config.json"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(damage, qwen2_checkpoint, data, straight, tmp_path,
                                                            capsys):
    out = tmp_path / "run"
    sft(qwen2_checkpoint, data, out, stop_at_step=5, save_every=2)  # checkpoints at steps 4 and 5
    newest = latest_checkpoint(out)
    assert newest.name == "step-000005" and checkpoint_problem(newest) is None
    action, name = damage.split(" ")
    if action == "delete":
        (newest / name).unlink()
    else:
        with open(newest / name, "r+b") as f:
            f.truncate(os.path.getsize(newest / name) // 2)
    assert name in checkpoint_problem(newest) and latest_checkpoint(out).name == "step-000004"
    final = sft(qwen2_checkpoint, data, out, resume=True, save_every=2)
    warning = capsys.readouterr().err
    assert "step-000005 is damaged" in warning and name in warning and "resuming from step-000004" in warning
    assert_same_as_straight(out, final, straight)


def test_resume_without_any_complete_checkpoint_says_what_is_wrong(qwen2_checkpoint, data, tmp_path):
    out = tmp_path / "run"
    sft(qwen2_checkpoint, data, out, stop_at_step=2)
    (latest_checkpoint(out) / "model.safetensors").write_bytes(b"\x08\x00")
    with pytest.raises(MinirlhfError, match=r"no complete checkpoint .*step-000002: model.safetensors: truncated"):
        sft(qwen2_checkpoint, data, out, resume=True)


def test_a_crash_while_deleting_an_old_checkpoint_leaves_no_half_checkpoint(qwen2_checkpoint, data, straight,
                                                                           tmp_path, monkeypatch):
    """Rotation renames an old checkpoint out of the way before deleting it: a crash midway leaves
    a hidden temporary (removed on the next start), never a ``step-N`` with half its files."""
    import minirlhf.data.atomic as atomic

    out = tmp_path / "run"
    real_rmtree = atomic.shutil.rmtree

    def crash(path, *args, **kwargs):
        if ".step-000002." in str(path) and Path(path).exists():
            (Path(path) / "model.safetensors").unlink()  # half deleted
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        sft(qwen2_checkpoint, data, out, save_every=2)  # the third save deletes step-000002
    monkeypatch.undo()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[-3:] == ["latest", "step-000004", "step-000006"] and names[0].startswith(".step-000002.tmp-")
    os.rename(out / "checkpoints" / names[0], out / "checkpoints" / f".step-000002.tmp-{HOST}-{dead_pid()}-abcd1234")
    final = sft(qwen2_checkpoint, data, out, resume=True, save_every=2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000006", "step-000008"]
    assert_same_as_straight(out, final, straight)


# ---------------------------------------------------------------------------------------------
# Temporaries of killed writers
# ---------------------------------------------------------------------------------------------


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(qwen2_checkpoint, data, straight, tmp_path):
    out = tmp_path / "run"
    sft(qwen2_checkpoint, data, out, stop_at_step=4)
    root, pid = out / "checkpoints", dead_pid()
    leftovers = {  # name -> removed on the next start?
        f".step-000006.tmp-{HOST}-{pid}-k2j4h5g6": True,  # a checkpoint being written when the run was killed
        f".args.json.tmp-{HOST}-{pid}-0a1b2c3d": True,  # an atomic_file temporary
        ".step-000005.tmp-x8y7z6w5": True,  # from a version before the process id was in the name
        f".step-000006.tmp-{HOST}-{os.getpid()}-livelive": False,  # a live process's
        f".step-000006.tmp-other-host-{pid}-abcdabcd": False,  # another machine's: its process is unknown here
    }
    for name in leftovers:
        folder = (out if name.startswith(".args") else root) / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    final = sft(qwen2_checkpoint, data, out, resume=True)
    for name, removed in leftovers.items():
        assert ((out if name.startswith(".args") else root) / name).exists() != removed, name
    assert same_weights(final, straight["final"])


def test_a_crash_between_the_two_renames_of_a_replacement_restores_the_old_directory(tmp_path):
    """``write_dir_atomic`` replaces a directory by moving the old one aside, then renaming the new
    one into place; killed between the two, the next writer (or run) moves the old one back."""
    final = write_dir_atomic(tmp_path / "final", lambda d: (d / "weights").write_text("v1"))
    pid = dead_pid()
    os.replace(final, tmp_path / f".final.old-{HOST}-{pid}-0f0f0f0f")  # the first rename, then the kill
    (tmp_path / f".final.tmp-{HOST}-{pid}-1a2b3c4d").mkdir()
    assert remove_stale_temporaries(tmp_path) and (final / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ---------------------------------------------------------------------------------------------
# Starting a run: what --out already holds
# ---------------------------------------------------------------------------------------------


def test_a_run_that_crashed_before_its_first_checkpoint_is_started_over(qwen2_checkpoint, data, straight, tmp_path,
                                                                          monkeypatch, capsys):
    import minirlhf.train.sft as sft_module

    out, real_loss, calls = tmp_path / "run", sft_module.sft_loss, []

    def crash_at_step_3(model, batch):
        calls.append(1)  # evaluations at steps 0 and 2 take 2 calls each, a training step 1
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(sft_module, "sft_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        sft(qwen2_checkpoint, data, out)  # evaluations at steps 0 and 2; the first checkpoint would be at 8
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(out, "eval")] == [0, 2] and latest_checkpoint(out) is None
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    final = sft(qwen2_checkpoint, data, out)  # the same command again, without --resume
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert_same_as_straight(out, final, straight)  # eval.csv steps [0, 2, 4, 6, 8]: never [0, 0, 2, ...]
    with pytest.raises(MinirlhfError, match="already holds a run"):
        sft(qwen2_checkpoint, data, out)  # a finished run is never overwritten


def test_out_that_is_a_file_another_algorithm_or_a_finished_run_is_a_clear_error(qwen2_checkpoint, data, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(MinirlhfError, match="is a file"):
        sft(qwen2_checkpoint, data, file)
    assert file.read_text() == "mine"
    out = tmp_path / "run"
    final = sft(qwen2_checkpoint, data, out, stop_at_step=2)
    with pytest.raises(MinirlhfError, match="holds a sft run, not dpo-sigmoid"):
        train_dpo(DPOArgs(model=str(qwen2_checkpoint), data=str(data.pref_train), out=str(out), resume=True, **FAST))
    with pytest.raises(MinirlhfError, match=r"--stop-at-step 1: the resumed run already has 2 steps done"):
        sft(qwen2_checkpoint, data, out, resume=True, stop_at_step=1)
    with pytest.raises(MinirlhfError, match="checkpoint has 2 steps done, but this run has 1 in all"):
        sft(qwen2_checkpoint, data, out, resume=True, epochs=0.25)
    assert final.name == "step-000002"
    for path in (out / "checkpoints").iterdir():  # only final/ left: still a finished run
        path.unlink() if path.is_file() else os.rename(path, tmp_path / path.name)
    os.rename(tmp_path / "step-000002", out / "final")
    with pytest.raises(MinirlhfError, match=r"already holds a run \(final\)"):
        sft(qwen2_checkpoint, data, out)


# ---------------------------------------------------------------------------------------------
# Files a run writes besides checkpoints
# ---------------------------------------------------------------------------------------------


def test_a_crash_while_writing_final_is_resumed_to_the_same_model_and_logs(qwen2_checkpoint, data, straight, tmp_path,
                                                                             monkeypatch):
    import minirlhf.train.checkpoints as checkpoints

    out, real_save = tmp_path / "run", checkpoints.write_dir_atomic

    def crash_in_final(path, write, **kwargs):
        if Path(path).name == "final":
            def half(tmp):
                (tmp / "config.json").write_text("{")
                raise KeyboardInterrupt
            return real_save(path, half, **kwargs)
        return real_save(path, write, **kwargs)

    monkeypatch.setattr(checkpoints, "write_dir_atomic", crash_in_final)
    with pytest.raises(KeyboardInterrupt):
        sft(qwen2_checkpoint, data, out)
    monkeypatch.undo()
    assert not (out / "final").exists() and latest_checkpoint(out).name == "step-000008"
    (out / f".final.tmp-{HOST}-{dead_pid()}-deadbeef").mkdir()  # what a kill (not an exception) leaves
    final = sft(qwen2_checkpoint, data, out, resume=True)
    assert_same_as_straight(out, final, straight)  # no second evaluation row at step 8
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_damaged_args_json_and_a_metrics_line_cut_by_a_crash(qwen2_checkpoint, data, straight, tmp_path, capsys):
    out = tmp_path / "run"
    sft(qwen2_checkpoint, data, out, stop_at_step=4)
    (out / "args.json").write_text('{"model": "trunc')
    with open(out / "train.csv", "a") as f:
        f.write("5,0.12")  # step 5's row, cut by the kill before its newline
    with open(out / "eval.csv", "a") as f:
        f.write("4")
    final = sft(qwen2_checkpoint, data, out, resume=True)
    assert "args.json is unreadable" in capsys.readouterr().err
    assert_same_as_straight(out, final, straight)
    assert json.loads((out / "args.json").read_text())["algorithm"] == "sft"


def test_a_damaged_dpo_reference_cache_is_computed_again(qwen2_checkpoint, data, tmp_path, capsys):
    base = dict(model=str(qwen2_checkpoint), data=str(data.pref_train), eval_data=str(data.pref_test), epochs=2,
                lr=1e-2, batch_size=4, **FAST)
    full = train_dpo(DPOArgs(out=str(tmp_path / "full"), **base))
    for damage in ("truncate", "other data"):
        out = tmp_path / damage
        train_dpo(DPOArgs(out=str(out), stop_at_step=3, **base))
        cache = out / "reference_logps.pt"
        if damage == "truncate":
            cache.write_bytes(cache.read_bytes()[:100])
        else:  # a cache of another data file: one log-prob per example no longer
            torch.save({"train": torch.zeros(3), "eval": torch.zeros(3)}, cache)
        resumed = train_dpo(DPOArgs(out=str(out), resume=True, **base))
        assert "reference_logps.pt is unusable" in capsys.readouterr().err
        assert same_weights(resumed, full)


def test_score_keeps_the_old_output_when_it_crashes_mid_write(qwen2_checkpoint, tmp_path, monkeypatch):
    from minirlhf.eval import score
    from minirlhf.models.reward_model import RewardModel
    from minirlhf.models.policy import load_tokenizer

    rm = tmp_path / "rm"
    RewardModel.from_causal_lm(str(qwen2_checkpoint)).save_pretrained(rm, load_tokenizer(qwen2_checkpoint))
    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "hi", "response": f"answer {i}"} for i in range(3)])
    out = tmp_path / "gen.scored.jsonl"
    out.write_text("the previous output\n")
    real_dumps, calls = json.dumps, []

    def crash_on_second_record(record, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_dumps(record, **kwargs)

    monkeypatch.setattr("minirlhf.data.atomic.json.dumps", crash_on_second_record)
    with pytest.raises(KeyboardInterrupt):
        score.main(["--model", str(rm), "--data", str(data)])
    assert out.read_text() == "the previous output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl", "gen.scored.jsonl", "rm"]


# ---------------------------------------------------------------------------------------------
# The toy world's cache and the pipeline's stages
# ---------------------------------------------------------------------------------------------


def test_an_interrupted_toy_world_build_leaves_nothing_and_is_rebuilt(tmp_path, monkeypatch):
    import minirlhf.toy.world as world_module
    from minirlhf.toy.corpus import CorpusSizes

    sizes = CorpusSizes(pref_train=8, pref_test=8, pku_train=4, sft_train=8, sft_test=4, kto_train=4, prompts=4,
                        eval_prompts=4)
    real_build = world_module._build_base

    def crash_after_the_data(seed, out, sizes):
        real_build(seed, out, sizes)
        (out / "world.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(world_module, "_build_base", crash_after_the_data)
    with pytest.raises(KeyboardInterrupt):
        world_module.load_world(seed=0, cache_dir=tmp_path, sizes=sizes)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / f".toy-0-{world_module.VERSION}-8-8-4-8-4-4-4-4.tmp-{HOST}-{dead_pid()}-zzzz1111"
    (stale / "data").mkdir(parents=True)  # what a kill during the build leaves
    world = world_module.load_world(seed=0, cache_dir=tmp_path, sizes=sizes)
    assert (world.dir / "world.json").exists() and not stale.exists()


def test_the_pipeline_resumes_an_interrupted_stage_and_restarts_one_without_a_complete_checkpoint(
        qwen2_checkpoint, data, straight, tmp_path, monkeypatch):
    from minirlhf.pipeline import PipelineArgs, run_stage

    pipeline = PipelineArgs(out=str(tmp_path))
    messages = []

    def make_args():
        return SFTArgs(model=str(qwen2_checkpoint), data=str(data.sft_train), eval_data=str(data.sft_test),
                       save_every=2, **SFT)

    def crash_after_step_5(args):
        args.stop_at_step = 5
        train_sft(args)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage("sft", pipeline, crash_after_step_5, make_args(), messages.append)
    final = run_stage("sft", pipeline, train_sft, make_args(), messages.append)  # resumed from step 5
    assert_same_as_straight(tmp_path / "sft", final, straight)
    assert run_stage("sft", pipeline, None, make_args(), messages.append) == final and "already trained" in messages[-1]
    # A stage whose checkpoints are all damaged is trained again from the start.
    with pytest.raises(KeyboardInterrupt):
        run_stage("again", pipeline, crash_after_step_5, make_args(), messages.append)
    for checkpoint in (tmp_path / "again" / "checkpoints").glob("step-*"):
        (checkpoint / "training_state.pt").write_bytes(b"")
    final = run_stage("again", pipeline, train_sft, make_args(), messages.append)
    assert "training the stage again" in " ".join(messages) and same_weights(final, straight["final"])
