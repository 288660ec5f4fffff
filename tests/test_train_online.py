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
import dataclasses
import json
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from fixtures import multinomial_sampling_reference, write_jsonl
from minirlhf.models.forward import position_ids_from_attention_mask, response_logprobs
from minirlhf.models.policy import load_policy, load_tokenizer
from minirlhf.models.reward_model import RewardModel
from minirlhf.errors import MinirlhfError
from minirlhf.models.sampling import cache_keyword, generate_rollouts, sample_responses
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


def full_forward_greedy(model, batch, row, steps, stop=()):
    """Greedy tokens of row ``row`` without cache and without padding: the argmax of a full forward
    over the growing prefix, until a ``stop`` token (included) or ``steps`` tokens."""
    ids, tokens = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist(), []
    for _ in range(steps):
        with torch.no_grad():
            tokens.append(int(model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].argmax()))
        if tokens[-1] in stop:
            break
    return tokens


def test_cached_greedy_sampling_matches_full_forward_and_ignores_left_padding(tiny_policy, tiny_tokenizer):
    batch = prompt_batch(tiny_tokenizer, ["what is 3 plus 4 ?", "tell me everything you know about dogs ."])
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is left-padded
    no_stop = [len(tiny_tokenizer) + 10]  # an id that is never sampled: every row runs 8 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. "`past_key_values` is deprecated ... Use `cache`"
        tokens, valid = sample_responses(tiny_policy, batch["input_ids"], batch["attention_mask"], 8, no_stop,
                                         tiny_tokenizer.pad_token_id, temperature=0)
    assert valid.all() and tokens.shape == (2, 8)
    for row in range(2):
        assert tokens[row].tolist() == full_forward_greedy(tiny_policy, batch, row, 8)


class Wrapped(torch.nn.Module):
    """``model`` behind a forward with another signature (subclasses); ``ignore_cache`` drops the
    cache it is given, as a removed keyword swallowed by ``**kwargs`` would be."""

    def __init__(self, model, ignore_cache=False):
        super().__init__()
        self.model, self.config, self.ignore_cache = model, model.config, ignore_cache

    def run(self, cache, **kwargs):
        keep = {} if self.ignore_cache or cache is None else {cache_keyword(self.model): cache}
        return self.model(**kwargs, **keep)


class TakesCache(Wrapped):
    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None, logits_to_keep=0):
        return self.run(cache, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, logits_to_keep=logits_to_keep)


class TakesPastKeyValues(Wrapped):
    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        return self.run(past_key_values, input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=use_cache, logits_to_keep=logits_to_keep)


class TakesNoCache(Wrapped):
    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0, **kwargs):
        return self.run(None, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, logits_to_keep=logits_to_keep)


def test_the_sampler_passes_its_cache_under_the_name_the_model_takes(tiny_policy, tiny_tokenizer):
    """``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier, remote code), read from the
    forward's signature; a model that takes neither is a clear error, never a silently ignored cache."""
    import inspect

    assert cache_keyword(tiny_policy) in inspect.signature(type(tiny_policy).forward).parameters
    batch = prompt_batch(tiny_tokenizer, ["what is 3 plus 4 ?", "describe rain ."])
    expected = [full_forward_greedy(tiny_policy, batch, row, 6) for row in range(2)]
    pad, never = tiny_tokenizer.pad_token_id, [len(tiny_tokenizer) + 10]

    def greedy(model):
        return sample_responses(model, batch["input_ids"], batch["attention_mask"], 6, never, pad, temperature=0)[0]

    assert greedy(TakesCache(tiny_policy)).tolist() == greedy(TakesPastKeyValues(tiny_policy)).tolist() == expected
    with pytest.raises(MinirlhfError, match="neither `cache` nor `past_key_values`"):
        greedy(TakesNoCache(tiny_policy))


def sampling_distributions(model, policy, batch, steps, monkeypatch):
    """``(recorded, expected)``: the distributions ``sample_responses`` drew each token from (``[steps,
    B, V]``, recorded as it samples at temperature 1), and those of a full forward (no cache) over
    the prompts and the sampled tokens."""
    import minirlhf.models.sampling as sampling

    recorded = []
    monkeypatch.setattr(sampling, "next_token_probs", lambda logits, t: recorded.append(torch.softmax(logits, -1))
                        or recorded[-1])
    never = [policy.config.vocab_size + 10]
    tokens, _ = sample_responses(model, batch["input_ids"], batch["attention_mask"], steps, never, 0,
                                 generator=torch.Generator().manual_seed(0))
    ids = torch.cat([batch["input_ids"], tokens], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], dim=1)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask)).logits
    width = batch["input_ids"].shape[1]
    return torch.stack(recorded), torch.softmax(logits[:, width - 1 : width - 1 + steps], -1).transpose(0, 1)


def test_every_token_is_drawn_from_the_full_forward_distribution(tiny_policy, tiny_tokenizer, monkeypatch):
    """The decode steps read the KV cache: each sampled token's distribution is the one a full
    forward (no cache) gives at its position — which a silently ignored cache would break."""
    batch = prompt_batch(tiny_tokenizer, ["what is 3 plus 4 ?", "tell me everything you know about dogs ."])
    recorded, expected = sampling_distributions(tiny_policy, tiny_policy, batch, 6, monkeypatch)
    torch.testing.assert_close(recorded.log(), expected.log(), atol=1e-4, rtol=0)
    recorded, expected = sampling_distributions(TakesCache(tiny_policy, ignore_cache=True), tiny_policy, batch, 6,
                                                monkeypatch)
    assert (recorded[1:].log() - expected[1:].log()).abs().amax(-1).min() > 1e-2  # each step saw only its newest token


@pytest.fixture(scope="module")
def lively_policy(tiny_tokenizer):
    """A tiny Qwen2 with larger initial weights: unlike ``tiny_policy`` (which repeats one token),
    its greedy continuations differ from prompt to prompt and from token to token."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2)
    return Qwen2ForCausalLM(config).eval()


def cache_cuts(monkeypatch):
    """A list that records the batch size the sampler cuts its KV cache down to, at each cut."""
    import minirlhf.models.sampling as sampling

    kept, select = [], sampling.DynamicCache.batch_select_indices
    monkeypatch.setattr(sampling.DynamicCache, "batch_select_indices",
                        lambda cache, rows: kept.append(len(rows)) or select(cache, rows))
    return kept


@pytest.mark.parametrize("check_every", [1, 3])
def test_stopped_rows_leave_the_batch_without_changing_the_others(lively_policy, tiny_tokenizer, monkeypatch,
                                                                  check_every):
    """Rows that stop early are dropped from the batch and its KV cache (at every look, or every
    ``check_every`` tokens as on a GPU): every row still decodes exactly its full-forward greedy
    tokens, and the response mask still ends at each row's first stop token."""
    import minirlhf.models.sampling as sampling

    monkeypatch.setitem(sampling.CHECK_EVERY, "cpu", check_every)
    texts = ["what is 3 plus 4 ?", "describe rain .", "tell me everything you know about dogs .", "how are you ?",
             "write a poem about the sea .", "what is 12 times 3 ?"]
    batch = prompt_batch(tiny_tokenizer, texts)
    free = [full_forward_greedy(lively_policy, batch, row, 10) for row in range(len(texts))]
    for stop in free[1]:  # a stop token that ends some rows early and leaves others running to the budget
        expected = [full_forward_greedy(lively_policy, batch, row, 10, stop=[stop]) for row in range(len(texts))]
        if sum(len(e) <= 3 for e in expected) >= 2 and max(map(len, expected)) == 10:
            break
    else:
        pytest.fail("no stop token ends some rows early and leaves others running")
    kept = cache_cuts(monkeypatch)
    tokens, valid = sample_responses(lively_policy, batch["input_ids"], batch["attention_mask"], 10, [stop],
                                     tiny_tokenizer.pad_token_id, temperature=0)
    assert tokens.shape[1] == 10 and kept and kept[-1] < len(texts)
    for row in range(len(texts)):
        n = len(expected[row])
        assert tokens[row, :n].tolist() == expected[row] and valid[row, :n].all() and not valid[row, n:].any()
        assert (tokens[row, n:] == tiny_tokenizer.pad_token_id).all()


@pytest.mark.parametrize("check_every", [1, 3])
def test_sampled_tokens_are_torch_multinomials_whatever_rows_leave_the_batch(lively_policy, tiny_tokenizer,
                                                                             monkeypatch, check_every):
    """With the same generator, ``sample_responses`` draws the tokens that ``torch.multinomial`` on
    the whole batch draws at every step (the loop before stopped rows left the batch, written out
    here without a cache): dropping rows changes neither the distribution nor the draws."""
    import minirlhf.models.sampling as sampling

    monkeypatch.setitem(sampling.CHECK_EVERY, "cpu", check_every)
    batch = prompt_batch(tiny_tokenizer, ["what is 3 plus 4 ?", "describe rain .", "how are you ?",
                                          "tell me everything you know about dogs ."])
    budget, temperature = 12, 1.5
    stops = list(range(0, len(tiny_tokenizer), 9))  # a ninth of the vocabulary stops a row: lengths vary
    expected = multinomial_sampling_reference(lively_policy, batch["input_ids"], batch["attention_mask"], budget,
                                              stops, tiny_tokenizer.pad_token_id, temperature,
                                              torch.Generator().manual_seed(5))
    kept = cache_cuts(monkeypatch)
    tokens, valid = sample_responses(lively_policy, batch["input_ids"], batch["attention_mask"], budget, stops,
                                     tiny_tokenizer.pad_token_id, temperature, torch.Generator().manual_seed(5))
    assert kept and len(set(valid.sum(-1).tolist())) > 1 and tokens.shape == expected.shape
    assert torch.equal(tokens, expected)


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


def test_ppo_minibatch_size_zero_is_the_whole_batch(qwen2_checkpoint, prompt_file, reward_model_dir, tmp_path):
    from minirlhf.train.ppo import PPOArgs, train_ppo

    def final_weights(name, minibatch_size):
        path = train_ppo(PPOArgs(model=str(qwen2_checkpoint), data=prompt_file, reward=reward_model_dir,
                                 out=str(tmp_path / name), steps=1, batch_size=2, minibatch_size=minibatch_size, **FAST))
        return load_policy(path).state_dict()

    whole, zero = final_weights("whole", 2), final_weights("zero", 0)  # 0 used to divide by zero
    assert all(torch.equal(whole[name], zero[name]) for name in whole)


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


def test_online_dpo_pairs_the_judges_best_and_worst_of_k_samples(qwen2_checkpoint, prompt_file, tmp_path, monkeypatch):
    """K = 4 samples per prompt: the pair is the judge's best and worst; with --soft-labels the pair's
    label is the judge's Bradley-Terry probability, i.e. cdpo with ε = σ(−(r_best − r_worst))."""
    from minirlhf.train import online_dpo

    judged, flip_rates = [], []

    def recording_judge(name, **kwargs):
        judge = load_reward(name, **kwargs)

        def score(rollout):
            judged.append(judge(rollout))
            return judged[-1]
        return score

    original_dpo_loss = online_dpo.dpo_loss

    def recording_dpo_loss(*args, **kwargs):
        flip_rates.append((kwargs["loss_type"], kwargs["label_smoothing"]))
        return original_dpo_loss(*args, **kwargs)

    monkeypatch.setattr(online_dpo, "load_reward", recording_judge)
    monkeypatch.setattr(online_dpo, "dpo_loss", recording_dpo_loss)
    args = online_dpo.OnlineDPOArgs(out=str(tmp_path / "k4"), model=str(qwen2_checkpoint), data=prompt_file, reward="gold",
                                    steps=1, batch_size=3, samples_per_prompt=4, soft_labels=True, **FAST)
    assert_finished_run(args.out, online_dpo.train_online_dpo(args), 1)
    (scores,) = judged
    assert scores.shape == (12,)
    grouped = scores.view(3, 4)
    spread = grouped.max(-1).values - grouped.min(-1).values
    row = read_metrics(tmp_path / "k4")[0]
    assert row["labelled_fraction"] == pytest.approx(float((spread > 0).float().mean()))
    if (spread > 0).any():
        assert row["judge_margin"] == pytest.approx(float(spread[spread > 0].mean()), rel=1e-5)
        ((loss_type, eps),) = flip_rates
        assert loss_type == "cdpo" and torch.allclose(eps, torch.sigmoid(-spread[spread > 0]))
    with pytest.raises(MinirlhfError, match="--samples-per-prompt 1: must be at least 2"):
        online_dpo.OnlineDPOArgs(samples_per_prompt=1)
    with pytest.raises(MinirlhfError, match="--soft-labels .* --loss sigmoid"):
        online_dpo.train_online_dpo(dataclasses.replace(args, loss="ipo", out=str(tmp_path / "ipo")))


ONLINE = {"ppo": ("minirlhf.train.ppo", "PPOArgs", "train_ppo"), "grpo": ("minirlhf.train.grpo", "GRPOArgs", "train_grpo"),
          "rloo": ("minirlhf.train.rloo", "RLOOArgs", "train_rloo"),
          "online_dpo": ("minirlhf.train.online_dpo", "OnlineDPOArgs", "train_online_dpo")}


def online_trainer(algo):
    """``(Args class, train function, the module's CLI main)`` of an online trainer."""
    import importlib

    module_name, args_name, train_name = ONLINE[algo]
    module = importlib.import_module(module_name)
    return getattr(module, args_name), getattr(module, train_name), module.main


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    from fixtures import build_gpt2_checkpoint

    return str(build_gpt2_checkpoint(tmp_path_factory.mktemp("gpt2"), dropout=0.1))


@pytest.mark.parametrize("algo", list(ONLINE))
def test_dropout_is_off_in_training_so_the_first_kl_is_exactly_zero(algo, gpt2_checkpoint, prompt_file, tmp_path):
    """GPT-2 has dropout 0.1. The first rollout is sampled by π_θ = π_ref, so the logged KL
    (log π_old − log π_ref, π_old scored in train mode) is exactly 0 — unless --keep-dropout."""
    Args, train, _ = online_trainer(algo)
    extra = {"ppo": dict(batch_size=4, minibatch_size=2), "online_dpo": dict(batch_size=2)}.get(
        algo, dict(batch_size=2, group_size=2))
    common_args = dict(model=gpt2_checkpoint, data=prompt_file, reward="gold", steps=1, **extra, **FAST)
    train(Args(out=str(tmp_path / "off"), **common_args))
    assert read_metrics(tmp_path / "off")[0]["kl"] == 0.0
    if algo == "grpo":  # the flag keeps it: then π_old and π_ref already differ at initialisation
        train(Args(out=str(tmp_path / "kept"), keep_dropout=True, **common_args))
        assert read_metrics(tmp_path / "kept")[0]["kl"] != 0.0


@pytest.mark.parametrize("algo", list(ONLINE))
@pytest.mark.parametrize("temperature", ["0", "-0.5", "nan"])
def test_temperature_zero_or_negative_is_refused_before_anything_loads(algo, temperature, capsys):
    from minirlhf import __main__ as cli

    Args, _, _ = online_trainer(algo)
    with pytest.raises(MinirlhfError, match="--temperature"):
        Args(temperature=float(temperature))
    args = Args()
    with pytest.raises(MinirlhfError, match="--temperature"):
        args.temperature = 0.0
    assert cli.main([algo.replace("_", "-"), "--temperature", temperature, "--data", "/nonexistent"]) == 2
    message = capsys.readouterr().err
    assert "--temperature" in message and ("generate --temperature 0" in message or "finite" in message)


def test_other_impossible_settings_are_refused_with_the_flag_named():
    from minirlhf.train.grpo import GRPOArgs

    for field, value, expected in [("group_size", 1, "at least 2"), ("lr", float("inf"), "finite"),
                                   ("batch_size", 0, "at least 1"), ("warmup_ratio", 1.5, r"\[0, 1\]")]:
        with pytest.raises(MinirlhfError, match=f"--{field.replace('_', '-')} .*{expected}"):
            GRPOArgs(**{field: value})


def test_a_nan_reward_stops_before_the_loss_naming_the_reward_prompt_and_value(qwen2_checkpoint, prompt_file,
                                                                               tmp_path):
    from minirlhf.train.grpo import GRPOArgs, train_grpo
    from minirlhf.train.rewards import RewardError, check_rewards

    bad_prompt = TOY_PROMPTS[4]

    @register_reward("test_nan_for_one_prompt")
    def nan_for_one(prompts, responses, answers):
        return [float("nan") if p == bad_prompt else 1.0 for p in prompts]

    args = GRPOArgs(model=str(qwen2_checkpoint), data=prompt_file, reward="test_nan_for_one_prompt", steps=3,
                    batch_size=9, group_size=2, out=str(tmp_path / "grpo"), **FAST)
    with pytest.raises(RewardError) as info:
        train_grpo(args)
    message = str(info.value)
    assert "'test_nan_for_one_prompt'" in message and bad_prompt[:40] in message and "nan" in message
    assert "lower --lr" not in message and "cannot help" in message
    assert not (tmp_path / "grpo" / "train.csv").exists() or not read_metrics(tmp_path / "grpo")  # nothing trained
    # The reward model's scores pass the same check; so must a rule's output type and length.
    rollout = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "prompts": ["a", "b"], "responses": ["x", "y"]}
    with pytest.raises(RewardError, match=r"'rm'.*row 1: prompt 'b', response 'y' -> inf"):
        check_rewards("rm", torch.tensor([0.5, float("inf")]), rollout)
    for wrong in ([1.0], [1.0, "2"], None):
        with pytest.raises(RewardError, match="one"):
            check_rewards("rule", wrong, rollout)
    assert check_rewards("rule", [True, 2], rollout).tolist() == [1.0, 2.0]


def test_a_reward_model_with_nan_weights_is_refused_when_loaded(qwen2_checkpoint, tmp_path):
    from minirlhf.train.rewards import RewardError

    model = RewardModel.from_causal_lm(str(qwen2_checkpoint))
    with torch.no_grad():
        model.score_head.weight[0, 0] = float("nan")
    with pytest.raises(RewardError, match="score_head.weight"):
        RewardModelReward(model)


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


def test_generate_survives_a_crash_and_resumes_to_the_same_file(qwen2_checkpoint, prompt_file, tmp_path, monkeypatch):
    """A run killed after its first batch leaves ``<out>.partial`` (and no ``<out>``); the same
    command then continues after the last complete batch and writes what an uninterrupted run
    writes. A line cut by the crash is dropped with its batch; other arguments start over."""
    from minirlhf.eval import generate

    argv = ["--model", str(qwen2_checkpoint), "--prompts", prompt_file, "--n", "2", "--max-new-tokens", "4",
            "--batch-size", "4"]
    assert generate.main(argv + ["--out", str(tmp_path / "straight.jsonl")]) == 0
    straight = (tmp_path / "straight.jsonl").read_text()
    out, partial = tmp_path / "gen.jsonl", tmp_path / "gen.jsonl.partial"
    real, batches = generate.generate_records, []

    def crash_after_one_batch(*args, **kwargs):
        if batches:
            raise KeyboardInterrupt  # the kill
        batches.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_records", crash_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        generate.main(argv + ["--out", str(out)])
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 4 * 2  # header + one batch
    with open(partial, "a") as f:
        f.write('{"prompt": "half a li')  # the crash cut the next batch's first line
    monkeypatch.setattr(generate, "generate_records", real)
    assert generate.main(argv + ["--out", str(out)]) == 0
    assert out.read_text() == straight and not partial.exists()
    records = [json.loads(line) for line in straight.splitlines()]
    assert all(len(r["response_ids"]) == r["response_tokens"] and r["prompt_ids"] for r in records)
    # A .partial from other arguments (another seed) is not resumed.
    batches.clear()
    monkeypatch.setattr(generate, "generate_records", crash_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        generate.main(argv + ["--out", str(out), "--seed", "1"])
    monkeypatch.setattr(generate, "generate_records", real)
    assert generate.main(argv + ["--out", str(out)]) == 0 and out.read_text() == straight


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
