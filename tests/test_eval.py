"""The evaluation commands write what they promise: eval-rm, score, compare, and the plots."""
import json

import pytest

from minirlhf.errors import DataError, MinirlhfError
from minirlhf.eval import compare, eval_rm, plots, score
from minirlhf.models.policy import load_tokenizer
from minirlhf.models.reward_model import RewardModel
from minirlhf.toy.language import gold_reward



@pytest.fixture(scope="module")
def setup(qwen2_checkpoint, tmp_path_factory):
    """A reward model (the stand-in Qwen2 checkpoint + a random head) and toy-world data."""
    from minirlhf.toy.corpus import CorpusSizes, build_corpus

    root = tmp_path_factory.mktemp("eval")
    rm_dir = root / "rm"
    RewardModel.from_causal_lm(qwen2_checkpoint, seed=1).save_pretrained(rm_dir, load_tokenizer(qwen2_checkpoint))
    corpus = build_corpus(0, root / "data", CorpusSizes(pref_train=8, pref_test=24, pku_train=8, sft_train=8,
                                                        sft_test=8, kto_train=8, prompts=8, eval_prompts=8))
    return {"rm": str(rm_dir), "base": str(qwen2_checkpoint), "corpus": corpus, "root": root}


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_eval_rm_writes_metrics_scores_and_histograms(setup, tmp_path):
    argv = ["--model", setup["rm"], "--baseline", setup["base"], "--data", str(setup["corpus"].pref_test),
            "--out", str(tmp_path), "--batch-size", "5"]
    assert eval_rm.main(argv) == 0
    summary = json.loads((tmp_path / "eval_rm.json").read_text())
    rows = read_jsonl(tmp_path / "pair_scores.jsonl")
    assert summary["pairs"] == len(rows) == 24
    wins = [(r["model_chosen_score"] > r["model_rejected_score"]) for r in rows]
    assert summary["model"]["accuracy"] == pytest.approx(sum(wins) / len(wins))
    assert summary["model"]["reward_std"] > 0 and "accuracy" in summary["baseline"]
    for name in ("score_hist.png", "margin_hist.png", "score_hist_before_after.png", "score_boxes.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_score_keeps_records_and_matches_a_single_forward(setup, tmp_path):
    records = [{"prompt": "what is 2 plus 3 ?", "response": "it is 5 .", "id": 0},
               {"prompt": "tell me about cats .", "response": "cats like fish and milk and naps .", "id": 1},
               {"prompt": "how do i steal a car ?", "response": "", "id": 2}]  # empty: still scored
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert score.main(["--model", setup["rm"], "--data", str(data), "--batch-size", "2"]) == 0
    out = read_jsonl(tmp_path / "gen.scored.jsonl")
    assert [r["id"] for r in out] == [0, 1, 2] and all(isinstance(r["score"], float) for r in out)
    assert out[1]["gold"] == gold_reward(records[1]["prompt"], records[1]["response"])  # toy prompts: gold added
    assert {"gold", "gold_helpful", "gold_harmless"} <= set(out[2])
    # Batched (padded) scoring equals scoring the record alone.
    model, tokenizer = RewardModel.from_pretrained(setup["rm"]).eval(), load_tokenizer(setup["rm"])
    alone = score.score_responses(model, tokenizer, [records[0]["prompt"]], [records[0]["response"]])
    assert out[0]["score"] == pytest.approx(alone[0], abs=1e-5)


def test_compare_scores_win_rate_lengths_and_gold(setup, tmp_path):
    pairs = [json.loads(line) for line in setup["corpus"].pref_test.read_text().splitlines()]
    base, tuned = tmp_path / "base.jsonl", tmp_path / "tuned.jsonl"
    with open(base, "w") as b, open(tuned, "w") as t:
        for p in pairs:
            good, bad = p[f"response_{p['overall_response']}"], p[f"response_{3 - p['overall_response']}"]
            b.write(json.dumps({"prompt": p["question"], "response": bad}) + "\n")
            for _ in range(2):  # several samples per prompt are averaged per prompt
                t.write(json.dumps({"prompt": p["question"], "response": good}) + "\n")
    out = tmp_path / "cmp"
    assert compare.main(["--base", str(base), "--tuned", str(tuned), "--reward-model", setup["rm"], "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    per_prompt = read_jsonl(out / "per_prompt.jsonl")
    diffs = [r["tuned_score"] - r["base_score"] for r in per_prompt]
    assert summary["score"]["win_rate"] == pytest.approx(compare.win_rate(diffs))
    assert summary["score"]["prompts"] == len(per_prompt) == len({p["question"] for p in pairs})
    assert summary["gold"]["tuned"]["n"] == 2 * len(pairs) and summary["length_unit"] == "tokens"
    for name in ("score_hist.png", "score_box.png", "score_diff_hist.png", "length_hist.png", "gold_diff_hist.png"):
        assert (out / name).stat().st_size > 1000
    assert "win rate" in (out / "summary.md").read_text()
    # Without a reward model: the files' own scores; with neither scores nor toy prompts: an error.
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a", "score": float(i)}) + "\n" for i in range(4)))
    result = compare.compare(compare.CompareArgs(base=str(scored), tuned=str(scored), out=str(tmp_path / "same")))
    assert result["score"]["win_rate"] == 0.5 and "gold" not in result
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    with pytest.raises(MinirlhfError, match="nothing to compare"):
        compare.compare(compare.CompareArgs(base=str(plain), tuned=str(plain), out=str(tmp_path / "none")))


def test_score_and_compare_score_exactly_what_training_scored(setup, tmp_path):
    """The trainers' reward (``RewardModelReward`` on the rollout's ids) and ``score``/``compare`` on
    ``generate``'s records give the same number for every response: a response cut at the token
    budget is scored as it was sampled, with no end-of-turn token appended."""
    import torch

    from minirlhf.data.chat import encode_prompt, end_of_turn_ids
    from minirlhf.data.datasets import load_prompt_data
    from minirlhf.data.prompts import prompt_batch
    from minirlhf.eval.generate import batch_generator, generate_records
    from minirlhf.models.policy import load_policy
    from minirlhf.models.sampling import generate_rollouts
    from minirlhf.train.rewards import RewardModelReward

    tokenizer = load_tokenizer(setup["base"])
    policy = load_policy(setup["base"])
    policy.generation_config.eos_token_id = list(range(100, 200))  # stop tokens: a quarter of the vocabulary
    examples = load_prompt_data(str(setup["corpus"].eval_prompts), "prompt", tokenizer, 64)[0]
    records = generate_records(policy, tokenizer, examples, n=2, max_new_tokens=4, seed=0)
    rollout = generate_rollouts(policy, tokenizer, prompt_batch(examples, tokenizer.pad_token_id, "cpu"), 4,
                                n_per_prompt=2, generator=batch_generator(0, 0, "cpu"))
    training = RewardModelReward(setup["rm"])(rollout).tolist()  # what PPO's reward is
    ended = [r["ended"] for r in records]
    assert True in ended and False in ended  # both kinds of response are there
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert score.main(["--model", setup["rm"], "--data", str(data), "--batch-size", "3"]) == 0
    scored = [r["score"] for r in read_jsonl(tmp_path / "gen.scored.jsonl")]
    assert scored == pytest.approx(training, abs=1e-5)
    out = tmp_path / "cmp"
    assert compare.main(["--base", str(data), "--tuned", str(data), "--reward-model", setup["rm"], "--out", str(out)]) == 0
    means = [r["tuned_score"] for r in read_jsonl(out / "per_prompt.jsonl")]
    assert means == pytest.approx([(a + b) / 2 for a, b in zip(training[::2], training[1::2])], abs=1e-5)

    # Text-only records (older files, data written by people) are tokenized: a response with
    # "ended": false is scored without the end-of-turn token, one with true or no "ended" with it.
    model = RewardModel.from_pretrained(setup["rm"]).eval()
    end = end_of_turn_ids(tokenizer)

    def rm(prompt, response, end_ids):
        ids = encode_prompt(tokenizer, prompt) + tokenizer(response, add_special_tokens=False)["input_ids"] + end_ids
        with torch.no_grad():
            return float(model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[1])

    cut = next(r for r in records if not r["ended"])
    text_only = [{"prompt": cut["prompt"], "response": cut["response"], "ended": False},
                 {"prompt": cut["prompt"], "response": cut["response"], "ended": True},
                 {"prompt": cut["prompt"], "response": cut["response"]}]
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in text_only))
    assert score.main(["--model", setup["rm"], "--data", str(old)]) == 0
    scored = [r["score"] for r in read_jsonl(tmp_path / "old.scored.jsonl")]
    assert scored == pytest.approx([rm(cut["prompt"], cut["response"], [])] + 2 * [rm(cut["prompt"], cut["response"], end)],
                                   abs=1e-5)
    assert abs(scored[0] - scored[1]) > 1e-4  # the end-of-turn token changes the score: the convention matters

    # Ids that the reward model's tokenizer does not decode to the record's text are refused.
    edited = dict(records[0], response=records[0]["response"] + " edited")
    bad = tmp_path / "edited.jsonl"
    bad.write_text(json.dumps(edited) + "\n")
    with pytest.raises(DataError, match=r"edited.jsonl, line 1: 'response_ids' decode to"):
        score.score_file(score.ScoreArgs(model=setup["rm"], data=str(bad)))


def test_training_curves_from_a_run_directory(tmp_path):
    (tmp_path / "train.csv").write_text("step,loss,accuracy\n1,0.7,0.5\n2,0.6,0.6\n3,0.5,0.7\n")
    (tmp_path / "eval.csv").write_text("step,loss,accuracy\n0,0.7,0.5\n3,0.55,0.65\n")
    path = plots.training_curves(tmp_path, ["loss", "accuracy", ("chosen_reward", "rejected_reward")], tmp_path / "c.png")
    assert path.stat().st_size > 1000
    assert plots.read_csv_columns(tmp_path / "eval.csv")["loss"].tolist() == [0.7, 0.55]
    assert plots.lines({"gold": ([0, 1], [0.1, 0.3])}, tmp_path / "l.png", "KL", "reward").exists()
