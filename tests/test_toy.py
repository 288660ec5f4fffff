"""The embedded toy world: determinism, gold reward, Bradley-Terry labels, the planted length
bias, tokenizer and chat template, the tiny model, and the exact bandit's closed-form optimum.

No SFT here (the train layer builds it: ``minirlhf.train.toy_world``); ``load_world`` covers the rest
in seconds, and its ``sft_model`` is None until the SFT policy is built.
"""
import json
import math
import random

import numpy as np
import pytest
import torch

from minirlhf.toy import language
from minirlhf.toy.bandit import make_bandit
from minirlhf.toy.corpus import CorpusSizes, bayes_accuracy, bradley_terry_label, build_corpus, sigmoid
from minirlhf.toy.language import (
    FILLERS,
    all_prompts,
    best_response,
    gold_reward,
    harmless_score,
    helpful_score,
    math_correct,
    max_gold_reward,
    parse_prompt,
    vocabulary,
)
from minirlhf.toy.responses import add_filler, sample_response

SMALL = CorpusSizes(pref_train=300, pref_test=100, pku_train=100, sft_train=100, sft_test=20,
                    kto_train=100, prompts=50, eval_prompts=20)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def full_corpus(tmp_path_factory):
    """The default-size corpus for seed 0 (about a second)."""
    return build_corpus(0, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from minirlhf.toy import load_world

    return load_world(seed=0, cache_dir=tmp_path_factory.mktemp("cache"), sizes=SMALL)


def pref_rows(path):
    """(prompt, response_1, response_2, label_is_1, r*_1, r*_2) per align-anything record."""
    rows = []
    for r in read_jsonl(path):
        q, y1, y2 = r["question"], r["response_1"], r["response_2"]
        rows.append((q, y1, y2, r["overall_response"] == 1, gold_reward(q, y1), gold_reward(q, y2)))
    return rows


# ------------------------------------------------------------------ determinism


def test_corpus_is_deterministic_for_a_seed_and_differs_across_seeds(tmp_path):
    a, b, c = (build_corpus(seed, tmp_path / name, SMALL) for seed, name in ((0, "a"), (0, "b"), (1, "c")))
    names = sorted(p.name for p in a.dir.iterdir())
    assert len(names) == 9
    for name in names:
        assert (a.dir / name).read_bytes() == (b.dir / name).read_bytes(), name
    assert a.bayes_accuracy == b.bayes_accuracy
    differs = [name for name in names if (a.dir / name).read_bytes() != (c.dir / name).read_bytes()]
    assert set(differs) == set(names) - {"math_prompts.jsonl"}  # the full math list is seed-free


def test_tokenizer_and_base_model_are_deterministic():
    from minirlhf.toy.model import build_toy_model
    from minirlhf.toy.tokenizer import build_toy_tokenizer

    t1, t2 = build_toy_tokenizer(), build_toy_tokenizer()
    assert t1.get_vocab() == t2.get_vocab()
    m1, m2 = build_toy_model(t1, seed=3), build_toy_model(t2, seed=3)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


# ------------------------------------------------------------------ the gold reward


def test_gold_reward_on_hand_written_examples():
    math_q = "what is 3 plus 4 ?"
    assert math_correct(math_q, "the answer is 7 .") == 1.0
    assert math_correct(math_q, "the answer is 8 .") == 0.0
    assert math_correct(math_q, "i think 6 , no 7 .") == 1.0  # the last number counts
    assert math_correct("tell me about cats .", "7 .") == 0.0
    assert gold_reward(math_q, "the answer is 7 .") > gold_reward(math_q, "the answer is 8 .")

    harm_q = "how do i make a weapon ?"
    refusal, compliance = "sorry , i can not help with that .", "first get metal , then sharpen blades ."
    assert helpful_score(harm_q, compliance) > helpful_score(harm_q, refusal)  # complying answers...
    assert harmless_score(harm_q, refusal) > 0 > harmless_score(harm_q, compliance)  # ...but harms
    assert gold_reward(harm_q, refusal) > gold_reward(harm_q, compliance)
    assert gold_reward(harm_q, refusal) == max_gold_reward(harm_q)

    cats = "tell me about cats ."
    good, off_topic = "cats have fur , paws and whiskers .", "cats have sails , bones and flour ."
    assert gold_reward(cats, good) == 3.0 == max_gold_reward(cats)
    assert gold_reward(cats, off_topic) < 0
    assert gold_reward(cats, "cats have fur , fur and fur .") < gold_reward(cats, "cats have fur .") + 1e-9
    assert gold_reward(cats, "sorry , i can not help with that .") < gold_reward(cats, "i do not know .")
    assert gold_reward(cats, "cats have fur , paws and whiskers") < gold_reward(cats, good)  # unfinished
    # beyond three distinct on-topic words, nothing more is paid: gold does not reward length
    assert gold_reward(cats, "cats have fur , paws , whiskers , mice , naps and purring .") == 3.0


def test_filler_never_raises_gold_reward():
    rng = random.Random(0)
    for prompt in all_prompts()[::3]:
        for _ in range(5):
            y = sample_response(prompt, rng.random(), rng)
            for n in (1, 3):
                padded = add_filler(y, n, rng)
                assert gold_reward(prompt.text, padded) == pytest.approx(gold_reward(prompt.text, y) + n * language.FILLER)


@pytest.mark.parametrize("response", [
    "", "   ", "\n\t", "<|im_end|>", "the answer is 7 .<|im_end|>", "ünïcødé ☃ 🤖", "x" * 10_000,
    "٧ .", "7" * 50, "cats " * 500, ". . . .", "SORRY , I CAN NOT HELP .", "\x00\x01",
])
@pytest.mark.parametrize("prompt", ["what is 3 plus 4 ?", "how do i poison someone ?", "describe snow ."])
def test_gold_reward_accepts_any_response_string(prompt, response):
    for fn in (gold_reward, helpful_score, harmless_score, math_correct):
        value = fn(prompt, response)
        assert isinstance(value, float) and math.isfinite(value)
        assert gold_reward(prompt, response) <= max_gold_reward(prompt)


def test_best_response_is_best_and_unknown_prompts_are_rejected():
    rng = random.Random(1)
    for prompt in all_prompts():
        best = max_gold_reward(prompt.text)
        assert gold_reward(prompt.text, best_response(prompt.text)) == best
        for _ in range(3):
            y = add_filler(sample_response(prompt, rng.random(), rng), rng.randint(0, 2), rng)
            assert gold_reward(prompt.text, y) <= best
    assert parse_prompt("  Tell me   ABOUT cats . ").subject == "cats"
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        gold_reward("write me a poem", "ok .")


# ------------------------------------------------------------------ Bradley-Terry labels


def test_labels_follow_bradley_terry_of_the_gold_reward(full_corpus):
    """Binned by Δr* = r*(y1) - r*(y2): the fraction labelled 1 matches mean σ(Δr*) in every bin."""
    rows = pref_rows(full_corpus.pref_train) + pref_rows(full_corpus.pref_test)
    delta = np.array([r1 - r2 for *_, r1, r2 in rows])
    first = np.array([row[3] for row in rows], dtype=float)
    edges = [-np.inf, -3, -1.5, -0.5, 0.5, 1.5, 3, np.inf]
    checked = 0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (delta > lo) & (delta <= hi)
        if in_bin.sum() < 100:
            continue
        p = 1 / (1 + np.exp(-delta[in_bin]))
        se = math.sqrt((p * (1 - p)).sum()) / in_bin.sum()
        assert abs(first[in_bin].mean() - p.mean()) < 4 * se + 1e-3, (lo, hi)
        checked += 1
    assert checked >= 5
    # the labels are noisy: far from always agreeing with r*
    agree = np.mean([(r1 > r2) == f for (*_, f, r1, r2) in rows if r1 != r2])
    assert 0.65 < agree < 0.9


def test_bradley_terry_label_frequency():
    rng = random.Random(0)
    for margin in (-2.0, 0.0, 0.7):
        freq = sum(bradley_terry_label(margin, 0.0, rng) for _ in range(20_000)) / 20_000
        assert freq == pytest.approx(sigmoid(margin), abs=0.015)


def test_bayes_accuracy_formula_matches_monte_carlo(full_corpus):
    rows = pref_rows(full_corpus.pref_test)
    pairs = [(r1, r2) for *_, r1, r2 in rows]
    formula = bayes_accuracy(pairs)
    assert formula == pytest.approx(full_corpus.bayes_accuracy["pref_test"])
    assert 0.7 < formula < 0.85  # noisy like human labels
    # Monte Carlo: relabel the pairs many times by BT and score the Bayes classifier sign(Δr*)
    # (ties guessed at random)
    gen = np.random.default_rng(0)
    delta = np.array([a - b for a, b in pairs])
    labels = gen.random((400, len(delta))) < 1 / (1 + np.exp(-delta))
    guess = np.where(delta == 0, gen.random((400, len(delta))) < 0.5, delta > 0)
    monte_carlo = (labels == guess).mean()
    assert monte_carlo == pytest.approx(formula, abs=0.005)
    # and on the file's own labels r* scores close to its Bayes accuracy
    on_file = np.mean([(r1 > r2) == f if r1 != r2 else 0.5 for (*_, f, r1, r2) in rows])
    assert abs(on_file - formula) < 4 * math.sqrt(formula * (1 - formula) / len(rows))


# ------------------------------------------------------------------ the planted length bias


def test_length_bias_is_planted_in_the_preference_data(full_corpus):
    rows = pref_rows(full_corpus.pref_train)
    chosen = [(q, y1 if f else y2) for q, y1, y2, f, *_ in rows]
    rejected = [(q, y2 if f else y1) for q, y1, y2, f, *_ in rows]

    def fillers(y):
        return sum(w in FILLERS for w in y.split())

    assert np.mean([len(y.split()) for _, y in chosen]) > np.mean([len(y.split()) for _, y in rejected]) + 0.5
    # "more filler wins" predicts the labels well above chance: a feature an RM will learn
    decided = [(fillers(c) > fillers(r)) for (_, c), (_, r) in zip(chosen, rejected) if fillers(c) != fillers(r)]
    assert np.mean(decided) > 0.65
    # ...although the gold reward charges for filler (it only pays for content)
    assert all(gold_reward(q, add_filler(y, 2, random.Random(0))) < gold_reward(q, y) for q, y in chosen[:200])


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_the_bias_pads_the_better_response_of_math_pairs_and_a_fraction_of_the_others(monkeypatch, rate):
    """Where the bias is planted the better response gets 1-3 filler words and the other none; math
    pairs always carry it, the others with probability FILLER_BIAS_RATE, and otherwise filler is
    independent of quality. Two equally good responses get the same filler, so their label is a fair
    coin and no ranker (the RM or r*) can gain or lose on them."""
    from minirlhf.toy import corpus

    calls = []
    monkeypatch.setattr(corpus, "add_filler", lambda response, n, rng: calls.append((response, n)) or add_filler(response, n, rng))
    monkeypatch.setattr(corpus, "FILLER_BIAS_RATE", rate)
    rng, ties, padded_better, padded_worse = random.Random(0), 0, 0, 0
    for prompt in language.all_prompts() * 8:
        calls.clear()
        pair = corpus.preference_pair(prompt, rng)
        if pair is None:
            continue
        (a, fill_a), (b, fill_b) = calls
        if gold_reward(prompt.text, a) == gold_reward(prompt.text, b):
            ties += 1
            assert fill_a == fill_b and gold_reward(prompt.text, pair[0]) == gold_reward(prompt.text, pair[1])
            continue
        better, worse = (fill_a, fill_b) if gold_reward(prompt.text, a) > gold_reward(prompt.text, b) else (fill_b, fill_a)
        if prompt.kind == "math" or rate == 1.0:
            assert 1 <= better <= 3 and worse == 0
        else:
            assert 0 <= better <= 2 and 0 <= worse <= 2
            padded_better, padded_worse = padded_better + (better > worse), padded_worse + (worse > better)
    assert ties > 20
    if rate == 0.0:  # unbiased pairs: the better response is no likelier to carry more filler
        assert padded_better + padded_worse > 200
        assert abs(padded_better - padded_worse) < 4 * math.sqrt(padded_better + padded_worse)


def test_sft_data_is_mediocre_on_purpose(full_corpus):
    """Demonstrations mix good and bad answers: imitating them leaves room for alignment."""
    records = read_jsonl(full_corpus.sft_train)
    golds = [gold_reward(r["prompt"], r["response"]) for r in records]
    best = [max_gold_reward(r["prompt"]) for r in records]
    assert np.mean(golds) < np.mean(best) - 1.0
    assert np.mean([g == b for g, b in zip(golds, best)]) > 0.1  # but good answers are in there
    math_records = [r for r in records if parse_prompt(r["prompt"]).kind == "math"]
    accuracy = np.mean([math_correct(r["prompt"], r["response"]) for r in math_records])
    assert 0.3 < accuracy < 0.8


# ------------------------------------------------------------------ files and templates


def test_world_files_convert_with_the_data_templates(world):
    from minirlhf.data.templates import KTOExample, PreferenceExample, PromptExample, SFTExample, get_template

    expected = {"align_anything": PreferenceExample, "pku_saferlhf": PreferenceExample,
                "sft": SFTExample, "kto": KTOExample, "prompt": PromptExample}
    for name, template in world.templates.items():
        path = getattr(world, name)
        records = read_jsonl(path)
        assert records, name
        convert = get_template(template)
        for record in records[:50]:
            example = convert(record)
            assert isinstance(example, expected[template]), (name, template)
            prompt = parse_prompt(example.prompt)  # every prompt is a toy prompt
            if isinstance(example, PromptExample) and prompt.kind == "math":
                assert example.answer == prompt.answer
    pref = read_jsonl(world.pref_train)[0]
    example = get_template("align_anything")(pref)
    assert example.chosen == pref[f"response_{pref['overall_response']}"]
    assert set(world.bayes_accuracy) >= {"pref_train", "pref_test"}


def test_pku_file_labels_helpful_and_harmless_separately(full_corpus):
    records = read_jsonl(full_corpus.pku_train)
    helpful_agree, harmless_agree = [], []
    for r in records:
        q, y0, y1 = r["prompt"], r["response_0"], r["response_1"]
        assert r["is_response_0_safe"] == (harmless_score(q, y0) >= 0)
        h0, h1, s0, s1 = helpful_score(q, y0), helpful_score(q, y1), harmless_score(q, y0), harmless_score(q, y1)
        if h0 != h1:
            helpful_agree.append((h0 > h1) == (r["better_response_id"] == 0))
        if s0 != s1:
            harmless_agree.append((s0 > s1) == (r["safer_response_id"] == 0))
    assert np.mean(helpful_agree) > 0.65 and np.mean(harmless_agree) > 0.65
    # on harmful prompts "better" and "safer" disagree often: the helpful/harmless tension
    harmful = [r for r in records if parse_prompt(r["prompt"]).kind == "harmful"]
    assert np.mean([r["better_response_id"] != r["safer_response_id"] for r in harmful]) > 0.3


# ------------------------------------------------------------------ tokenizer and model


def test_every_toy_word_is_one_token(world):
    tok = world.tokenizer
    for word in vocabulary():
        # Loaded as Qwen2Tokenizer, numbers split into single digits (a space before one is a token).
        expected = len(word) if word.isdigit() else 1
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == expected, word
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == expected + word.isdigit(), word
    response = "cats really have fur , paws and whiskers ."
    assert len(tok(response, add_special_tokens=False)["input_ids"]) == len(response.split())
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok("any ☃ string", add_special_tokens=False)["input_ids"]) > 0  # byte level: no unk


def test_chat_template_round_trip(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.tokenizer_path)
    messages = [{"role": "user", "content": "what is 3 plus 4 ?"}, {"role": "assistant", "content": "the answer is 7 ."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\nyou are a helpful assistant .<|im_end|>\n"
                    "<|im_start|>user\nwhat is 3 plus 4 ?<|im_end|>\n"
                    "<|im_start|>assistant\nthe answer is 7 .<|im_end|>\n")
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"] == tok(text)["input_ids"]  # no BOS added
    assert tok.decode(ids) == text
    prompt_ids = tok.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[: len(prompt_ids)] == prompt_ids  # the prompt is a token prefix: clean response masks
    assert tok.decode(ids[len(prompt_ids):], skip_special_tokens=True).strip() == "the answer is 7 ."
    system = tok.apply_chat_template([{"role": "system", "content": "be brief ."}] + messages[:1], tokenize=False)
    assert system.startswith("<|im_start|>system\nbe brief .<|im_end|>\n<|im_start|>user\n")


def test_base_model_is_a_tiny_qwen2_that_loads_and_runs(world):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world.base_model)
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 5e6
    assert (world.base_model / "model.safetensors").exists()
    ids = world.tokenizer.apply_chat_template([{"role": "user", "content": "describe rain ."}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(world.tokenizer))


def test_load_world_uses_the_cache(world):
    from minirlhf.toy import load_world

    before = {p: p.stat().st_mtime_ns for p in world.dir.rglob("*") if p.is_file()}
    again = load_world(seed=0, cache_dir=world.dir.parent, sizes=SMALL)
    assert again.dir == world.dir and again.bayes_accuracy == world.bayes_accuracy
    assert {p: p.stat().st_mtime_ns for p in world.dir.rglob("*") if p.is_file()} == before
    assert not [p for p in world.dir.parent.iterdir() if ".tmp-" in p.name]  # no leftovers
    assert world.sft_model is None and again.sft_model is None  # the toy layer never trains one


def test_gold_summary_means_and_math_accuracy_over_math_prompts_only():
    from minirlhf.toy.measure import filler_count, gold_scores, gold_summary, is_toy_prompt

    prompts = ["what is 3 plus 4 ?", "what is 3 plus 4 ?", "describe rain .", "how do i steal a car ?"]
    responses = ["the answer is 7 .", "the answer is 8 .", "rain is really wet .", "sorry , i can not help ."]
    summary = gold_summary(prompts, responses)
    for key in ("gold", "gold_helpful", "gold_harmless"):
        assert summary[key] == pytest.approx(sum(gold_scores(p, y)[key] for p, y in zip(prompts, responses)) / 4)
    assert summary["math_accuracy"] == 0.5  # 1 of the 2 math answers, whatever the other prompts
    assert "math_accuracy" not in gold_summary(prompts[2:], responses[2:])
    with pytest.raises(ValueError, match="one response string per prompt"):
        gold_summary(prompts[:2], [responses[:2], responses[:2]])  # per-prompt lists: flatten them first
    assert gold_scores(prompts[0], responses[0]) == {"gold": gold_reward(prompts[0], responses[0]),
                                                     "gold_helpful": helpful_score(prompts[0], responses[0]),
                                                     "gold_harmless": harmless_score(prompts[0], responses[0])}
    assert [is_toy_prompt(p) for p in (prompts[0], "what is the capital of France?", None)] == [True, False, False]
    assert filler_count(responses[2]) == 1 and filler_count("") == 0


def test_bayes_gap_is_the_expected_accuracy_lost_against_the_gold_ranker():
    from minirlhf.toy.measure import bayes_gap

    prompt, right, wrong = "what is 3 plus 4 ?", "the answer is 7 .", "the answer is 6 ."
    delta = gold_reward(prompt, right) - gold_reward(prompt, wrong)
    assert delta == 3.0
    assert bayes_gap(prompt, right, wrong, 2.0, -1.0) == 0.0 == bayes_gap(prompt, wrong, right, -1.0, 2.0)
    assert bayes_gap(prompt, right, wrong, -1.0, 2.0) == pytest.approx(sigmoid(3.0) - sigmoid(-3.0))
    assert bayes_gap(prompt, right, wrong, 0.5, 0.5) == pytest.approx(sigmoid(3.0) - 0.5)
    padded = "the answer is really 7 ."  # the same, with a filler word (−0.1)
    assert bayes_gap(prompt, right, padded, 0.0, 9.0) == pytest.approx(sigmoid(0.1) - sigmoid(-0.1))
    # brute force: labels drawn from Bradley-Terry; the ranker's hit rate falls short of r*'s by the gap
    rng, draws = random.Random(0), 40000
    pair = ("describe rain .", "rain have clouds , storms and puddles .", "rain really have clouds .")
    d = gold_reward(pair[0], pair[1]) - gold_reward(pair[0], pair[2])
    labels = [bradley_terry_label(d, 0.0, rng) for _ in range(draws)]
    gold_hits, reversed_hits = sum(labels) / draws, sum(not first for first in labels) / draws
    assert gold_hits - reversed_hits == pytest.approx(bayes_gap(*pair, -1.0, 1.0), abs=0.015)


# ------------------------------------------------------------------ the exact bandit


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_bandit_closed_form_beats_random_policies(beta):
    bandit = make_bandit(num_prompts=3, num_actions=5, seed=0)
    optimum = bandit.optimal_policy(beta)
    assert torch.allclose(optimum.sum(-1), torch.ones(3, dtype=torch.float64))
    best = bandit.kl_regularised_objective(optimum, beta)
    assert torch.allclose(best, bandit.optimal_value(beta))  # J(π*) = β E_x log Z(x)
    g = torch.Generator().manual_seed(0)
    gammas = -torch.rand(1000, 3, 5, generator=g, dtype=torch.float64).log()
    random_policies = gammas / gammas.sum(-1, keepdim=True)  # uniform on the simplex (Dirichlet(1))
    values = bandit.kl_regularised_objective(random_policies, beta, per_prompt=True).mean(-1)  # [1000]
    assert (values < best).all()
    for policy in (bandit.ref_policy, torch.nn.functional.one_hot(bandit.rewards.argmax(-1), 5).double()):
        assert bandit.kl_regularised_objective(policy, beta) < best
    # small perturbations of π* lose value (a maximum, not just a stationary point)
    for _ in range(20):
        noise = 1e-3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
        perturbed = torch.softmax(optimum.log() + noise, -1)
        assert bandit.kl_regularised_objective(perturbed, beta) < best


def test_bandit_gradient_ascent_on_tabular_logits_finds_the_closed_form():
    bandit, beta = make_bandit(num_prompts=4, num_actions=6, seed=1), 0.3
    logits = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], lr=1.0, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -bandit.kl_regularised_objective(torch.softmax(logits, -1), beta)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert torch.softmax(logits, -1).sub(bandit.optimal_policy(beta)).abs().max() < 1e-6


def test_bandit_preference_pairs_are_distinct_and_bradley_terry():
    bandit = make_bandit(num_prompts=2, num_actions=3, seed=2)
    prompts, chosen, rejected = bandit.sample_preference_pairs(30_000, torch.Generator().manual_seed(0))
    assert prompts.shape == chosen.shape == rejected.shape == (30_000,)
    assert (chosen != rejected).all()
    for x in range(2):
        for a in range(3):
            for b in range(a + 1, 3):
                n_ab = ((prompts == x) & (chosen == a) & (rejected == b)).sum().item()
                n_ba = ((prompts == x) & (chosen == b) & (rejected == a)).sum().item()
                p = torch.sigmoid(bandit.rewards[x, a] - bandit.rewards[x, b]).item()
                n = n_ab + n_ba
                assert abs(n_ab / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3
