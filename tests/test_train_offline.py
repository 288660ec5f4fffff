"""Smoke runs of the offline trainers (SFT, RM, the DPO family) on a tiny model and toy data:
the loss goes down, the checkpoint reloads with plain transformers, resume/accumulation are exact."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from minirlhf import __main__ as cli
from minirlhf.errors import MinirlhfError
from minirlhf.models.reward_model import RewardModel
from minirlhf.train.dpo import LOSSES, DPOArgs, train_dpo
from minirlhf.train.kto import KTOArgs, train_kto
from minirlhf.train.metrics import read_metrics
from minirlhf.train.rm import RMArgs, train_rm
from minirlhf.train.sft import SFTArgs, train_sft

FAST = dict(progress=False, tensorboard=False, seed=0, max_len=64, warmup_ratio=0.0, lr_schedule="constant")


def rows(run, split="train"):
    return read_metrics(run, split)


def test_sft_smoke(toy, tmp_path):
    args = SFTArgs(model=toy["model"], data=str(toy["data"].sft_train), eval_data=str(toy["data"].sft_test),
                   out=str(tmp_path / "sft"), epochs=3, lr=5e-3, batch_size=16, eval_every=3, **FAST)
    final = train_sft(args)
    evals = rows(tmp_path / "sft", "eval")
    assert evals[0]["step"] == 0 and evals[-1]["loss"] < evals[0]["loss"] - 0.5
    assert rows(tmp_path / "sft")[-1]["loss"] < rows(tmp_path / "sft")[0]["loss"]
    # Plain transformers reloads the final model (and its tokenizer) and it is the trained one.
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.equal(reloaded(ids).logits, AutoModelForCausalLM.from_pretrained(toy["model"])(ids).logits)
    assert (final / "tokenizer.json").exists() and json.loads((tmp_path / "sft" / "args.json").read_text())["lr"] == 5e-3


def test_rm_smoke_and_reload_with_plain_transformers(toy, tmp_path):
    args = RMArgs(model=toy["model"], data=str(toy["data"].pref_train), eval_data=str(toy["data"].pref_test),
                  out=str(tmp_path / "rm"), epochs=4, lr=3e-3, batch_size=8, micro_batch_size=4, center_coef=0.01, **FAST)
    final = train_rm(args)
    train = rows(tmp_path / "rm")
    first, last = sum(r["loss"] for r in train[:4]) / 4, sum(r["loss"] for r in train[-4:]) / 4
    assert last < first and {"accuracy", "chosen_reward", "rejected_reward", "margin"} <= set(train[0])
    assert {"accuracy", "reward_mean", "reward_std"} <= set(rows(tmp_path / "rm", "eval")[-1])
    # The saved RM reloads as ours and as HF's sequence classifier, with the same score.
    ours = RewardModel.from_pretrained(final).eval()
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(ours(ids, torch.ones_like(ids))[1], hf(ids).logits[:, 0])


def test_rm_kwise(toy, tmp_path):
    args = RMArgs(model=toy["model"], data=toy["rankings"], loss="kwise", eval_fraction=0.2,
                  out=str(tmp_path / "kwise"), epochs=4, lr=3e-3, batch_size=4, **FAST)
    train_rm(args)
    train = rows(tmp_path / "kwise")
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])
    assert "accuracy" in rows(tmp_path / "kwise", "eval")[-1]


@pytest.mark.parametrize("loss", LOSSES)
def test_dpo_family_smoke(toy, tmp_path, loss):
    """Every --loss trains: evaluated on its own training pairs, the loss (KTO: the reward margin)
    improves on the starting point; the policy reloads with plain transformers."""
    pref = str(toy["data"].pref_train)
    extra = {"label_smoothing": 0.1} if loss in ("cdpo", "robust") else {}
    args = DPOArgs(model=toy["model"], data=pref, eval_data=pref, loss=loss, out=str(tmp_path / loss),
                   epochs=2, lr=1e-2, batch_size=16, micro_batch_size=8, eval_every=6, beta=0.5, **extra, **FAST)
    final = train_dpo(args)
    evals = rows(tmp_path / loss, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == rows(tmp_path / loss)[-1]["step"]
    if loss == "kto":  # KTO from a preference file: chosen 👍, rejected 👎; judged by the margin
        assert evals[0]["margin"] == pytest.approx(0.0, abs=1e-5) and evals[-1]["margin"] > 0.05
    else:
        assert evals[-1]["loss"] < evals[0]["loss"]
    if loss not in ("simpo", "orpo"):  # policy == reference at the start: rewards are exactly 0
        assert evals[0]["chosen_reward"] == pytest.approx(0.0, abs=1e-5)
    assert {"logps_chosen", "logps_rejected", "margin", "accuracy"} <= set(evals[-1])
    AutoModelForCausalLM.from_pretrained(final)


def test_dpo_reference_cache_and_exact_resume(toy, tmp_path):
    base = dict(model=toy["model"], data=str(toy["data"].pref_train), eval_data=str(toy["data"].pref_test),
                epochs=2, lr=1e-2, batch_size=8, rdpo_alpha=0.01, dpop_lambda=1.0, **FAST)
    full = train_dpo(DPOArgs(out=str(tmp_path / "full"), **base))
    cache = torch.load(tmp_path / "full" / "reference_logps.pt")
    assert cache["train"].shape == (2 * 48,) and cache["eval"].shape == (2 * 16,)
    train_dpo(DPOArgs(out=str(tmp_path / "cut"), stop_at_step=5, **base))
    resumed = train_dpo(DPOArgs(out=str(tmp_path / "cut"), resume=True, **base))
    a, b = AutoModelForCausalLM.from_pretrained(full), AutoModelForCausalLM.from_pretrained(resumed)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_kto_gradient_accumulation_is_exact(toy, tmp_path):
    """KTO's reference point z0 is taken over the whole batch and micro-batches (5+5+5+1) are
    weighed by their share, so micro-batching changes nothing but float rounding (which Adam's
    1/√v amplifies for near-zero gradients: hence 1e-5, against updates of lr = 1e-2)."""
    base = dict(model=toy["model"], data=str(toy["data"].kto_train), template="kto", loss="kto",
                epochs=1, lr=1e-2, batch_size=16, **FAST)
    big = AutoModelForCausalLM.from_pretrained(train_dpo(DPOArgs(out=str(tmp_path / "big"), **base)))
    small = AutoModelForCausalLM.from_pretrained(train_dpo(DPOArgs(out=str(tmp_path / "small"), micro_batch_size=5, **base)))
    for name, value in big.state_dict().items():
        torch.testing.assert_close(small.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    assert "kl" in rows(tmp_path / "big")[0]


def test_train_kto_is_what_dpo_loss_kto_runs(toy, tmp_path):
    """``train_kto(KTOArgs(...))`` and ``train_dpo(DPOArgs(loss="kto", ...))`` train the same policy."""
    base = dict(model=toy["model"], data=str(toy["data"].kto_train), template="kto", epochs=1, lr=1e-2,
                batch_size=16, **FAST)
    via_dpo = AutoModelForCausalLM.from_pretrained(train_dpo(DPOArgs(out=str(tmp_path / "dpo"), loss="kto", **base)))
    direct = AutoModelForCausalLM.from_pretrained(train_kto(KTOArgs(out=str(tmp_path / "kto"), **base)))
    for name, value in via_dpo.state_dict().items():
        assert torch.equal(direct.state_dict()[name], value), name
    assert rows(tmp_path / "dpo") == rows(tmp_path / "kto")


def test_cli_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["dpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--loss {sigmoid,cdpo,robust,ipo,hinge,simpo,orpo,kto}" in text
    assert "DPO-Positive" in text and "Examples per optimizer step" in text


def test_bad_arguments_are_clear_errors(toy, tmp_path):
    with pytest.raises(MinirlhfError, match="IPO"):
        train_dpo(DPOArgs(model=toy["model"], data=str(toy["data"].pref_train), loss="ipo", rdpo_alpha=0.1,
                          out=str(tmp_path / "x"), **FAST))
    with pytest.raises(MinirlhfError, match="--batch-size"):
        train_sft(SFTArgs(model=toy["model"], data=str(toy["data"].sft_test), batch_size=64, out=str(tmp_path / "y"), **FAST))


def test_ranking_file_errors_name_the_line_and_field(toy, tmp_path):
    from minirlhf.errors import DataError
    from minirlhf.models.policy import load_tokenizer
    from minirlhf.data.collate import collate_rankings
    from minirlhf.data.rankings import load_ranking_data

    tokenizer = load_tokenizer(toy["model"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "describe cats .", "responses": ["cats nap ."]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: field 'responses'"):
        load_ranking_data(bad, tokenizer, max_len=64, max_prompt_len=32)
    # Rankings of different K share one batch; the missing slots are masked out.
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "describe cats .", "responses": ["cats nap .", "cats .", "no ."]}) + "\n"
                    + json.dumps({"prompt": "describe dogs .", "responses": ["dogs run .", "dogs ."]}) + "\n")
    examples, report = load_ranking_data(good, tokenizer, max_len=64, max_prompt_len=32)
    batch = collate_rankings(examples, tokenizer.pad_token_id)
    assert report.kept == 2 and batch["rank_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["input_ids"].shape[0] == 6
