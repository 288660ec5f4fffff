"""The homework exercises: what each one grades, where it lives, its points and its hints.

Listed in the order of the notebook chapters (the student path of README.md). Each exercise is
one file of a submission (laid out like ``exercises/``), the functions of it that are graded, the
reference module they mirror, and its checks (``minirlhf/homework/checks/<name>.py``, imported
only when asked for). Hints come in stages: a nudge first, then a pointer, the formula last
(``python -m minirlhf grade --explain`` reveals more stages).

Points are earned per check: an exercise with ``max_points`` and ``n`` checks of which ``k`` pass
scores ``max_points · k / n``, rounded to one decimal (README.md, "Homework").
"""
import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Exercise:
    name: str
    chapter: int
    points: int
    file: str  # path inside a submission folder, e.g. "core/gae.py"
    reference: str  # the module holding the reference versions, e.g. "minirlhf.core.gae"
    functions: tuple  # the graded functions (a submission must define them)
    hints: tuple  # nudge, pointer, formula
    helpers: tuple = ()  # reference functions the graded ones are built on (blocked like them)
    elsewhere: tuple = ()  # ((module, names), ...): the same computation in other modules (the trainers)

    @property
    def blocked(self):
        """Reference functions a submission may not call for this exercise (it would grade minirlhf)."""
        return self.functions + self.helpers

    def checks(self):
        return importlib.import_module(f"minirlhf.homework.checks.{self.name}").CHECKS


EXERCISES = (
    Exercise("logprobs", 1, 8, "core/logprobs.py", "minirlhf.core.logprobs",
             ("shift_for_next_token", "gather_logprobs", "sequence_logprobs"),
             ("the logits at position l predict the token at l + 1: slice so that they line up.",
              "log softmax(z)[y] without a full log_softmax: subtract the max first, then logsumexp.",
              "shift: logits[:, :-1], input_ids[:, 1:], mask[:, 1:]; log p(y) = (z_y − m) − log Σ_j exp(z_j − m) "
              "with m = max_j z_j; sequence: Σ_t where(mask, logp, 0), / count.clamp(min=1) for the average."),
             helpers=("_chunk_logprobs",)),
    Exercise("find_the_bug_shift", 1, 3, "find_the_bug/shift.py", "minirlhf.homework.find_the_bug.shift",
             ("response_logprobs",),
             ("which logit predicts which token, and which mask entry says whether that token counts?",
              "compare with log_softmax(logits)[:, :-1] gathered at input_ids[:, 1:], row by row.",
              "the mask follows the labels: response_mask[:, 1:], not response_mask[:, :-1]."),),
    Exercise("bradley_terry", 2, 6, "core/reward_losses.py", "minirlhf.core.reward_losses",
             ("bradley_terry_loss", "kwise_bradley_terry_loss"),
             ("−log σ(x) overflows for large |x| if you write it with torch.sigmoid.",
              "the K-wise loss weighs each prompt once: average over its C(K,2) pairs, then over prompts.",
              "L = mean −logsigmoid(r_c − r_r − m) + c·mean (r_c + r_r)²; K-wise: for pairs i < j, "
              "−logsigmoid(r_i − r_j) summed per prompt / its pair count, mean over prompts; ties count ½."),),
    Exercise("rm_end_score", 2, 4, "models/reward_model.py", "minirlhf.models.reward_model",
             ("end_token_index",),
             ("the score is read at the LAST real token of each row, wherever the padding is.",
              "read the attention mask, never input_ids != pad_id (pad == eos tokenizers).",
              "max over l of l · attention_mask[b, l]."),),
    Exercise("find_the_bug_end_token", 2, 3, "find_the_bug/end_token.py", "minirlhf.homework.find_the_bug.end_token",
             ("end_scores",),
             ("try a right-padded batch whose tokenizer has pad_token_id == eos_token_id.",
              "which tensor knows which positions are real tokens?",
              "is_real = attention_mask.long(), not input_ids != pad_token_id."),),
    Exercise("kl", 3, 6, "core/kl.py", "minirlhf.core.kl", ("kl_penalty", "kl_shaped_rewards"),
             ("write each estimator with Δ = log π − log π_ref; mind float32 round-off near Δ = 0.",
              "the shaped reward puts the score on the LAST valid token of each row (any padding, holes too).",
              "k1 = Δ, k2 = Δ²/2, k3 = expm1(−Δ) + Δ; r_t = −β·kl_t (0 where mask = 0), plus the score at "
              "t = max{t : mask_t = 1}; a row without a valid token is a ValueError."),),
    Exercise("dpo", 4, 8, "core/dpo_losses.py", "minirlhf.core.dpo_losses", ("dpo_loss",),
             ("start from h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)).",
              "every branch is a function of z = βh − offset (IPO: of h); use F.logsigmoid; rewards are detached.",
              "sigmoid −logσ(z); cdpo −(1−ε)logσ(z) − ε logσ(−z); "
              "robust [−(1−ε)logσ(z) + ε logσ(−z)]/(1−2ε); "
              "ipo (h − 1/(2β))²; hinge relu(1 − z); rewards β·(log π − log π_ref).detach()."),),
    Exercise("simpo", 4, 4, "core/dpo_losses.py", "minirlhf.core.dpo_losses", ("simpo_loss",),
             ("SimPO has no reference model; its inputs are already length-averaged.",
              "it is DPO's sigmoid loss with the reference log-probs set to 0 and a margin γ.",
              "−logsigmoid(β·a_w − β·a_l − γ); rewards β·a (detached)."),),
    Exercise("dpo_step", 4, 9, "homework/steps.py", "minirlhf.homework.steps",
             ("pair_reference_logps", "dpo_step"),
             ("one forward over chosen and rejected together, reference log-probs computed once without grad.",
              "collate_preference gives [2B, L]: chosen rows first; response_logprobs + sequence_logprobs, chunk(2).",
              "loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, β)[0].mean(); loss.backward(); "
              "metrics from the detached implicit rewards."),
             elsewhere=(("minirlhf.train.dpo", ("pairwise_preference_loss", "evaluate_dpo")),
                        ("minirlhf.train.preference", ("sequence_logps", "reference_logps", "cached_reference_logps",
                                                       "sigmoid_dpo_metrics")))),
    Exercise("masked", 5, 5, "core/masked.py", "minirlhf.core.masked", ("masked_mean", "masked_whiten"),
             ("divide by the number of valid elements, and think about a row that has none.",
              "select with torch.where (0 · NaN is NaN); whiten with the valid elements' own mean and variance.",
              "mean = masked_sum(x)/count.clamp(min=1); whiten: (x − μ)·rsqrt(σ² + eps) (+ μ if not shift_mean), "
              "0 where mask = 0."),),
    Exercise("gae", 5, 8, "core/gae.py", "minirlhf.core.gae", ("gae_advantages",),
             ("loop t backwards over the columns, vectorised over the rows.",
              "a masked position is not a time step: carry V_next and A_next across it; after the last valid "
              "token V = A = 0.",
              "δ_t = r_t + γV_next − V_t, A_t = δ_t + γλA_next, returns = A + V; 0 where mask = 0; no gradient."),),
    Exercise("ppo", 6, 8, "core/ppo_losses.py", "minirlhf.core.ppo_losses",
             ("clipped_surrogate", "ppo_policy_loss", "ppo_value_loss"),
             ("the min (policy) and the max (value) are pessimistic: write both branches, then pick.",
              "ρ = exp(log π − log π_old); clip the ratio (policy) or the change V − V_old (value); aggregate "
              "over the mask with aggregate_token_losses.",
              "policy −min(ρA, clip(ρ, 1−ε, 1+ε)A), clipped where strictly smaller; value "
              "½·max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²); diagnostics detached."),),
    Exercise("aggregation", 7, 4, "core/aggregation.py", "minirlhf.core.aggregation", ("aggregate_token_losses",),
             ("three normalisers: per sequence, per token, per fixed budget.",
              "masked_mean with dim=-1 gives per-sequence means; skip rows without tokens.",
              "sequence_mean: mean over non-empty rows of the row means; token_mean: Σ ℓ / Σ mask; "
              "fixed_length: Σ ℓ / (B · max_len)."),),
    Exercise("grpo", 7, 8, "core/grpo.py", "minirlhf.core.grpo",
             ("group_advantages", "rloo_advantages", "grpo_loss"),
             ("view the rewards as [num_groups, G] and reduce over the last dimension.",
              "a constant group must give exactly 0; RLOO's baseline is the mean of the OTHER samples; "
              "grpo_loss is clipped_surrogate with one advantage per row plus β·k3.",
              "(r − mean)/(std + eps) (unbiased std); RLOO r_i − (Σ − r_i)/(G − 1); "
              "loss = agg(−min(ρA, clip(ρ)A) + β·k3), kl = masked_mean(k3) detached."),),
    Exercise("grpo_step", 7, 9, "homework/steps.py", "minirlhf.homework.steps", ("grpo_step",),
             ("sample once with generate_rollouts(..., generator=generator), then score with reward_fn.",
              "one update per rollout: π_old is the policy that sampled, so old log-probs are the current "
              "ones detached; π_ref's come without gradient.",
              "advantages = group_advantages(rewards, G); loss = grpo_loss(logp, logp.detach(), ref, A, mask, "
              "clip_eps, beta)[0]; loss.backward()."),
             elsewhere=(("minirlhf.train.grpo", ("grpo_step_loss",)),)),
    Exercise("find_the_bug_kl", 8, 3, "find_the_bug/kl_direction.py", "minirlhf.homework.find_the_bug.kl_direction",
             ("k3_penalty",),
             ("k3 = (ρ − 1) − log ρ is unbiased only for the right ρ.",
              "on a 3-token distribution compare Σ_y π(y) k3(y) with KL(π ‖ π_ref).",
              "log ρ = log π_ref − log π (ρ = π_ref/π), not the other way round."),),
    Exercise("template", 9, 4, "data/templates.py", "minirlhf.data.templates", ("homework_template",),
             ("model it on align_anything: pick the label, then index the outputs.",
              "use choice_field for the label and text_field for the texts, so bad records name the field.",
              "choice_field(record, 'preferred', ('a', 'b')); chosen = the named output, rejected = the other."),),
)
BY_NAME = {exercise.name: exercise for exercise in EXERCISES}
# Chapters 10-13 (best-of-n and calibration, online DPO / RLOO, many GPUs, fitting one GPU) add no
# graded exercise: they reuse the ones above (README.md, "Homework", has the whole student path).


def exercise_of(function):
    """The exercise that grades ``function`` (a name), or None."""
    return next((ex for ex in EXERCISES if function in ex.blocked), None)
