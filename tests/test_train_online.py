"""The online trainers (PPO, GRPO, RLOO, online DPO), their rollouts, rewards and `generate`.

All on the tiny Qwen2-shaped checkpoint of ``conftest.py`` (random weights, 2 layers), with toy-
world prompts so the gold reward is logged too. What is checked:

- rollouts: the KV-cached sampling loop reproduces a full forward's greedy choices; a prompt's
  continuation does not depend on the left padding around it; ``response_mask`` stops at the
  first EOS (included) and everything after it is padding;
- each trainer runs a few seconds, logs finite metrics, and saves a policy that plain
  transformers loads; GRPO improves a trivial reward; one PPO update moves log-probs in the
  direction of the advantages; PPO and GRPO resume exactly;
- reward functions, ``python -m minirlhf generate``, the over-optimisation plot.
"""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from fixtures import write_jsonl
from minirlhf.models.forward import response_logprobs
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.models.reward_model import RewardModel
from minirlhf.models.sampling import generate_rollouts, sample_responses
from minirlhf.toy.language import all_prompts
from minirlhf.train.metrics import MetricsLogger, read_metrics
from minirlhf.train.rewards import REWARD_FUNCTIONS, RewardModelReward, load_reward, register_reward

# Three prompts of each toy-world kind, interleaved (math ones carry their answers).
_KINDS = {kind: [p for p in all_prompts() if p.kind == kind] for kind in ("helpful", "harmful", "math")}
_KINDS = {kind: ps[:: len(ps) // 3][:3] for kind, ps in _KINDS.items()}
TOY = [p for triple in zip(*_KINDS.values()) for p in triple]
TOY_PROMPTS = [p.text for p in TOY]
FAST = dict(progress=False, tensorboard=False, max_new_tokens=6, template="prompt", seed=0)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    records = [{"prompt": p.text, **({"answer": p.answer} if p.answer is not None else {})} for p in TOY]
    return str(write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", records))


@pytest.fixture(scope="module")
def reward_model_dir(qwen2_checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("rm")
    RewardModel.from_causal_lm(str(qwen2_checkpoint), seed=0).save_pretrained(directory, load_tokenizer(qwen2_checkpoint))
    return str(directory)


def prompt_batch(tokenizer, texts):
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    ids = [i["input_ids"] if isinstance(i, dict) or hasattr(i, "keys") else i for i in ids]
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids]),
        "attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
        "prompts": list(texts),
    }


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------


def test_cached_greedy_sampling_matches_full_forward_and_ignores_left_padding(tiny_policy, tiny_tokenizer):
    batch = prompt_batch(tiny_tokenizer, ["what is 3 plus 4 ?", "tell me everything you know about dogs ."])
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is left-padded
    no_stop = [len(tiny_tokenizer) + 10]  # an id that is never sampled: every row runs 8 tokens
    tokens, valid = sample_responses(tiny_policy, batch["input_ids"], batch["attention_mask"], 8, no_stop,
                                     tiny_tokenizer.pad_token_id, temperature=0)
    assert valid.all() and tokens.shape == (2, 8)
    for row in range(2):
        # Without cache and without padding: argmax of a full forward over the growing prefix.
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        for t in range(8):
            logits = tiny_policy(input_ids=torch.tensor([ids])).logits[0, -1]
            assert int(logits.argmax()) == int(tokens[row, t])
            ids.append(int(tokens[row, t]))


def test_response_mask_ends_at_first_eos(tiny_policy, tiny_tokenizer):
    batch = prompt_batch(tiny_tokenizer, ["what is 3 plus 4 ?", "describe rain ."])
    pad = tiny_tokenizer.pad_token_id
    tokens, _ = sample_responses(tiny_policy, batch["input_ids"], batch["attention_mask"], 8, [10**6], pad, temperature=0)
    stop = int(tokens[0, 2])  # make row 0's third greedy token the stop token
    tokens2, valid = sample_responses(tiny_policy, batch["input_ids"], batch["attention_mask"], 8, [stop], pad, temperature=0)
    first_stop = [int((row == stop).nonzero()[0]) if (row == stop).any() else None for row in tokens]
    for row in range(2):
        n = tokens.shape[1] if first_stop[row] is None else first_stop[row] + 1
        assert valid[row, :n].all() and not valid[row, n:].any()  # EOS included, nothing after it
        assert torch.equal(tokens2[row, :n], tokens[row, :n])
        assert (tokens2[row, n:] == pad).all()


def test_generate_rollouts_batch_layout(tiny_policy, tiny_tokenizer):
    batch = prompt_batch(tiny_tokenizer, ["what is 3 plus 4 ?", "describe rain ."])
    torch.manual_seed(0)
    rollout = generate_rollouts(tiny_policy, tiny_tokenizer, batch, max_new_tokens=6, n_per_prompt=3)
    P = batch["input_ids"].shape[1]
    assert rollout["input_ids"].shape[0] == 6 and rollout["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert rollout["prompts"] == ["what is 3 plus 4 ?"] * 3 + ["describe rain ."] * 3
    assert not rollout["response_mask"][:, :P].any()  # prompts (and their padding) are not response
    assert torch.equal(rollout["attention_mask"][:, :P], batch["attention_mask"].repeat_interleave(3, 0))
    assert torch.equal(rollout["attention_mask"][:, P:], rollout["response_mask"][:, P:])
    assert torch.equal(rollout["response_mask"].sum(-1), rollout["response_length"])
    # Response masks are contiguous from the first generated column.
    response = rollout["response_mask"][:, P:]
    assert torch.equal(response, (torch.arange(response.shape[1]) < rollout["response_length"][:, None]).long())


def test_toy_measure_samples_with_the_trainers_sampler(tiny_policy, tiny_tokenizer):
    """``toy.measure.sample_policy`` (the toy world's report on a policy) is ``generate_rollouts``."""
    from minirlhf.toy.measure import sample_policy

    prompts = TOY_PROMPTS[:4]
    greedy = sample_policy(tiny_policy, tiny_tokenizer, prompts, num_samples=2, max_new_tokens=5, temperature=0,
                           batch_size=3)
    rollout = generate_rollouts(tiny_policy, tiny_tokenizer, prompt_batch(tiny_tokenizer, prompts), 5, n_per_prompt=2,
                                temperature=0)
    assert greedy == [[y.strip() for y in rollout["responses"][2 * i : 2 * i + 2]] for i in range(4)]


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


def test_math_reward_uses_the_answer_or_the_toy_world():
    fn = REWARD_FUNCTIONS["math"]
    assert fn(["what is 3 plus 4 ?"] * 3, ["the answer is 7 .", "the answer is 8 .", "7 , i think 9"], None) == [1.0, 0.0, 0.0]
    assert fn(["anything"] * 2, ["so it is 1,024.", "42"], [1024, "41"]) == [1.0, 0.0]


def test_reward_model_reward_scores_end_token_and_rejects_foreign_ids(reward_model_dir, tiny_tokenizer):
    reward = load_reward(reward_model_dir)
    assert isinstance(reward, RewardModelReward)
    batch = prompt_batch(tiny_tokenizer, ["what is 3 plus 4 ?", "describe rain ."])
    scores = reward(batch)
    _, expected = reward.model(batch["input_ids"], batch["attention_mask"])
    assert scores.shape == (2,) and torch.allclose(scores, expected)
    with pytest.raises(Exception, match="vocabulary"):
        reward({"input_ids": batch["input_ids"] + 10**5, "attention_mask": batch["attention_mask"]})


# ---------------------------------------------------------------------------------------------
# Trainers: smoke runs, direction of an update, improvement, resume
# ---------------------------------------------------------------------------------------------


def assert_finished_run(out, path, steps):
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    for row in rows:
        for name, value in row.items():
            assert math.isfinite(value), (name, value)
    model = AutoModelForCausalLM.from_pretrained(path)  # plain transformers loads the policy
    assert model.config.model_type == "qwen2"
    return rows


def test_ppo_smoke_with_reward_model_and_gold_logging(qwen2_checkpoint, prompt_file, reward_model_dir, tmp_path):
    from minirlhf.train.ppo import PPOArgs, train_ppo

    out = tmp_path / "ppo"
    path = train_ppo(PPOArgs(model=str(qwen2_checkpoint), data=prompt_file, reward=reward_model_dir, out=str(out),
                             steps=2, batch_size=4, minibatch_size=2, micro_batch_size=1, adaptive_kl=True, **FAST))
    rows = assert_finished_run(out, path, 2)
    assert {"reward", "gold", "kl", "entropy", "clip_fraction", "value_loss", "response_length", "beta"} <= set(rows[0])
    assert rows[0]["kl"] == 0.0  # the first rollout comes from π_ref itself
    assert rows[1]["beta"] != rows[0]["beta"]  # the adaptive controller moved β
    assert (out / "critic" / "model.safetensors").exists()


def test_grpo_rloo_online_dpo_smoke(qwen2_checkpoint, prompt_file, reward_model_dir, tmp_path):
    from minirlhf.train.grpo import GRPOArgs, train_grpo
    from minirlhf.train.online_dpo import OnlineDPOArgs, train_online_dpo
    from minirlhf.train.rloo import RLOOArgs, train_rloo

    common_args = dict(model=str(qwen2_checkpoint), data=prompt_file, steps=2, batch_size=2, **FAST)
    runs = [
        (train_grpo, GRPOArgs(out=str(tmp_path / "grpo"), reward=reward_model_dir, group_size=3,
                              aggregation="fixed_length", scale="none", micro_batch_size=4, **common_args)),
        (train_rloo, RLOOArgs(out=str(tmp_path / "rloo"), reward="gold", group_size=2, **common_args)),
        (train_online_dpo, OnlineDPOArgs(out=str(tmp_path / "odpo"), reward=reward_model_dir, micro_batch_size=1,
                                         **common_args)),
    ]
    for train, args in runs:
        rows = assert_finished_run(args.out, train(args), 2)
        assert {"reward", "gold", "kl", "response_length"} <= set(rows[0])


def test_one_ppo_update_moves_logprobs_along_the_advantages(qwen2_checkpoint, tiny_tokenizer):
    """First-order property of a policy-gradient step: Σ_t A_t · Δlog π_t > 0 after one small step."""
    from minirlhf.core.masked import masked_sum
    from minirlhf.models.value_model import ValueModel
    from minirlhf.train.ppo import PPOArgs, ppo_loss

    policy = load_policy(qwen2_checkpoint)
    critic = ValueModel.from_causal_lm(str(qwen2_checkpoint))
    torch.manual_seed(0)
    rollout = generate_rollouts(policy, tiny_tokenizer, prompt_batch(tiny_tokenizer, TOY_PROMPTS[:4]), 6, n_per_prompt=2)
    with torch.no_grad():
        old_logprobs, mask = response_logprobs(policy, rollout["input_ids"], rollout["attention_mask"], rollout["response_mask"])
        old_values = critic(rollout["input_ids"], rollout["attention_mask"])[:, :-1]
    advantages = torch.where(mask.bool(), torch.randn(mask.shape), 0.0)
    batch = {k: rollout[k] for k in ("input_ids", "attention_mask", "response_mask")}
    batch.update(old_logprobs=old_logprobs, old_values=old_values, advantages=advantages, returns=old_values)
    loss, _ = ppo_loss(policy, critic, batch, PPOArgs(entropy_coef=0.0))
    loss.backward()
    torch.optim.SGD(policy.parameters(), lr=1e-2).step()
    with torch.no_grad():
        new_logprobs, _ = response_logprobs(policy, rollout["input_ids"], rollout["attention_mask"], rollout["response_mask"])
    assert masked_sum(advantages * (new_logprobs - old_logprobs), mask) > 0


def test_grpo_improves_a_trivial_reward(qwen2_checkpoint, tiny_tokenizer, prompt_file, tmp_path):
    """Reward = number of spaces in the response: ten GRPO steps raise it severalfold (measured on
    256 fresh samples before and after, so sampling noise cannot fake the gain)."""
    from minirlhf.train.grpo import GRPOArgs, train_grpo

    @register_reward("test_spaces")
    def spaces(prompts, responses, answers):
        return [r.count(" ") / 4 for r in responses]

    def mean_reward(path):
        torch.manual_seed(123)
        batch = prompt_batch(tiny_tokenizer, TOY_PROMPTS[:4])
        rollout = generate_rollouts(load_policy(path), tiny_tokenizer, batch, 8, n_per_prompt=64)
        return float(load_reward("test_spaces")(rollout).mean())

    args = GRPOArgs(model=str(qwen2_checkpoint), data=prompt_file, reward="test_spaces", out=str(tmp_path / "grpo"),
                    steps=10, batch_size=4, group_size=4, lr=3e-2, beta=0.0, **{**FAST, "max_new_tokens": 8})
    before, after = mean_reward(qwen2_checkpoint), mean_reward(train_grpo(args))
    assert after > 2 * before + 0.2, (before, after)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_resume_continues_exactly(algo, qwen2_checkpoint, prompt_file, tmp_path):
    from minirlhf.train.grpo import GRPOArgs, train_grpo
    from minirlhf.train.ppo import PPOArgs, train_ppo

    Args, train = {"ppo": (PPOArgs, train_ppo), "grpo": (GRPOArgs, train_grpo)}[algo]
    # PPO: minibatches and an adaptive β (saved in the checkpoint); GRPO: two epochs of minibatches.
    extra = dict(minibatch_size=2, adaptive_kl=True) if algo == "ppo" else dict(group_size=2, minibatch_size=2, ppo_epochs=2)

    def make(out, **kw):
        return Args(model=str(qwen2_checkpoint), data=prompt_file, reward="gold", out=str(out), steps=2,
                    batch_size=2, **extra, **FAST, **kw)

    straight = AutoModelForCausalLM.from_pretrained(train(make(tmp_path / "a")))
    train(make(tmp_path / "b", stop_at_step=1))
    resumed = AutoModelForCausalLM.from_pretrained(train(make(tmp_path / "b", resume=True)))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")


# ---------------------------------------------------------------------------------------------
# generate and the over-optimisation plot
# ---------------------------------------------------------------------------------------------


def test_generate_command_writes_jsonl_with_gold(qwen2_checkpoint, prompt_file, tmp_path):
    from minirlhf.eval.generate import main

    out = tmp_path / "gen.jsonl"
    assert main(["--model", str(qwen2_checkpoint), "--prompts", prompt_file, "--out", str(out), "--n", "2",
                 "--max-new-tokens", "5", "--temperature", "0", "--batch-size", "3"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [p for p in TOY_PROMPTS for _ in range(2)]
    assert all(isinstance(r["response"], str) and "gold" in r and r["response_tokens"] <= 5 for r in records)
    assert records[0]["response"] == records[1]["response"]  # greedy: both samples agree
    assert [r.get("answer") for r in records[::2]] == [p.answer for p in TOY]


def test_overoptimisation_plot(tmp_path):
    from minirlhf.eval.overoptimisation import overoptimisation_curves, plot_overoptimisation

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 11):
        logger.log(step, {"kl": step, "reward": 0.3 * step, "gold": step - 0.1 * step**2})
    logger.close()
    curves = overoptimisation_curves(tmp_path, smooth=1)
    assert curves["proxy"][0] == 0 and curves["gold"][0] == 0 and curves["proxy"][-1] > 0
    assert curves["gold"].argmax() not in (0, 9)  # gold rises then falls: over-optimisation
    path = plot_overoptimisation({"β=0.01": tmp_path}, tmp_path / "overopt.png")
    assert path.stat().st_size > 1000
