"""The RL stage of CAGSR (§4, §5, Figure 1): sample N candidates per prompt, score them with the
attention reward of §3.2, and update the policy with PPO (or plain REINFORCE with a baseline).

    J(theta)  = E_x E_{y ~ pi_theta(.|x)} [ R(x, y) ]                                      (§4)
    r_t       = pi_theta(y_t | x, y_<t) / pi_theta_old(y_t | x, y_<t)
    L_PPO     = E[ min(r_t A, clip(r_t, 1 - eps, 1 + eps) A) ]
    A         = R(x, y) - V_theta_old(x)       one sequence-level advantage on every token

The file reads top to bottom: the config and its per-size profiles, the pure functions (one per
equation, each tested), then `collect` (a rollout: sample, reward, advantages), `update` (the PPO
epochs) and `train` (the loop of Figure 1). The RL stage of the command line (cli/stages.py's
`rl_stage`) adds the evaluation, checkpoints and metrics log around `train`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import data
import parallel
from checks import (
    AT_LEAST_0,
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    check_fields,
    finite_number,
)
from model import token_logprobs
from parallel import MAX_BAD, NonFiniteError
from reward import RewardConfig, SalientTokens, compute_reward, response_mean
from sampling import Decoding, token_entropy


@dataclass
class PPOConfig:
    algo: str = "ppo"
    """"ppo" (§4) or "pg": REINFORCE with a baseline, the "standard policy gradient" the paper
    compares with: one epoch over each rollout, one step per minibatch (on-policy only with
    minibatches 1)."""
    prompts_per_iter: int = 64
    """Prompts per iteration (§7.2: 64)."""
    num_samples: int = 4
    """N candidates per prompt (§7.2: 4)."""
    lr: float = 1e-5
    """Adam learning rate (§7.2: 1e-5)."""
    clip_eps: float = 0.2
    """PPO clipping epsilon (§7.2: 0.2)."""
    epochs: int = 1
    """PPO epochs over each rollout."""
    minibatches: int = 1
    """Minibatches per epoch (split by prompt, so a prompt's N candidates stay together)."""
    baseline: str = "value"
    """"value": V(x) of the value head (§4, §7.2); "group": the mean reward of the other N-1
    candidates of the same prompt (RLOO/GRPO-style); "none"."""
    whiten: bool = False
    """Normalise advantages to mean 0 and std 1 over the rollout."""
    value_coef: float = 0.1
    """Weight of the value loss (V(x) - R)^2 in the total loss (used only with baseline "value"; the
    paper states none, 0.1 is the project's choice)."""
    value_warmup: int = 0
    """Iterations at the start that fit only the value head on the SFT policy's samples."""
    entropy_coef: float = 0.0
    """Weight of the policy-entropy bonus."""
    kl_coef: float = 0.0
    """KL penalty to the frozen SFT policy, subtracted from R (InstructGPT). 0 = the paper."""
    kl_target: float | None = None
    """If set, an adaptive controller (Ziegler et al. 2019) steers kl_coef towards this KL
    per sequence."""
    kl_horizon: int = 10_000
    """Horizon of the adaptive KL controller, in samples."""
    kl_k3_coef: float = 0.0
    """Optional k3 KL estimate to the SFT policy as a loss term (GRPO-style), instead of or
    beside kl_coef."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping (0 = off; the paper states none, 1.0 is the project's choice)."""
    temperature: float = 1.0
    """Sampling temperature: RL draws from softmax(logits / temperature) over the whole vocabulary,
    the distribution of the ratio, the KL and the rival rewards (DECISIONS.md §3). CPU profiles:
    chosen by measurement (results/README.md, "How the CPU RL settings were chosen")."""
    top_k: int | None = None
    """Top-k sampling for --stage sample and display only (§5 names "top-k or nucleus
    sampling"); RL refuses it, since its log-probabilities are of the full softmax
    (DECISIONS.md §3); none = off."""
    top_p: float | None = None
    """Nucleus sampling for --stage sample and display only, refused in RL like top_k;
    none = off."""
    max_new_tokens: int = 64
    """Longest sampled response (the project's choice: the paper states none)."""

    def __post_init__(self):
        check_fields(
            self,
            dict(
                algo=(lambda v: v in ("ppo", "pg"), "'ppo' or 'pg'"),
                baseline=(lambda v: v in ("value", "group", "none"), "'value', 'group' or 'none'"),
                prompts_per_iter=AT_LEAST_1,
                num_samples=AT_LEAST_1,
                lr=POSITIVE,
                clip_eps=POSITIVE,
                epochs=AT_LEAST_1,
                minibatches=AT_LEAST_1,
                value_coef=NON_NEGATIVE,
                value_warmup=AT_LEAST_0,
                entropy_coef=NON_NEGATIVE,
                kl_coef=NON_NEGATIVE,
                kl_target=(lambda v: v is None or POSITIVE[0](v), "a positive number, or none"),
                kl_horizon=AT_LEAST_1,
                kl_k3_coef=NON_NEGATIVE,
                max_grad_norm=NON_NEGATIVE,
                temperature=POSITIVE,
                top_k=(lambda v: v is None or AT_LEAST_1[0](v), "a whole number >= 1, or none"),
                top_p=(
                    lambda v: v is None or (finite_number(v) and 0 < v <= 1),
                    "in (0, 1], or none",
                ),
                max_new_tokens=AT_LEAST_1,
            ),
        )
        if self.baseline == "group" and self.num_samples < 2:
            raise ConfigError(
                "num_samples",
                self.num_samples,
                "at least 2 with the group baseline (the other "
                "candidates of the same prompt), or use --baseline value",
                related="baseline",
            )
        if self.prompts_per_iter % self.minibatches:
            raise ConfigError(
                "minibatches",
                self.minibatches,
                f"a divisor of prompts_per_iter={self.prompts_per_iter} "
                f"(every minibatch takes the same number of prompts)",
                related="prompts_per_iter",
            )
        if self.kl_target is not None and self.kl_coef == 0:
            raise ConfigError(
                "kl_target",
                self.kl_target,
                "given with a starting kl_coef > 0: the adaptive "
                "controller multiplies kl_coef, so from 0 it would stay 0 (add e.g. --kl-coef 0.1)",
                related="kl_coef",
            )


def check_on_policy(cfg: PPOConfig) -> None:
    """RL samples from the distribution its ratio r_t, its KL estimate and the rival rewards use:
    softmax(logits / T) over the whole vocabulary. Top-k or top-p would draw from a truncated one,
    so tail tokens would never be sampled and never pushed down, and the k1 KL could turn negative
    (a bonus); a ConfigError here, before any work (DECISIONS.md §3)."""
    for name in ("top_k", "top_p"):
        if getattr(cfg, name) is not None:
            raise ConfigError(
                name,
                getattr(cfg, name),
                "none in RL: RL samples from the full softmax at the RL "
                "temperature, the distribution of its log-probabilities (top-k/top-p are for "
                "--stage sample)",
            )


# What the paper states (§4, §7.2): every other PPOConfig field is the project's choice.
PAPER = dict(
    algo="ppo",
    prompts_per_iter=64,
    num_samples=4,
    lr=1e-5,
    clip_eps=0.2,
    baseline="value",
    kl_coef=0.0,
)


# --------------------------------------------------------------------------------------------
# Pure functions, one per equation.
# --------------------------------------------------------------------------------------------


def masked(x, mask):
    """x where mask is True, 0 elsewhere: positions after EOS may hold extreme log-probabilities
    (below -88 the exp of a difference overflows), so every non-linear function below sees the
    masked value, never the raw one (inf * 0 would be NaN)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x, mask):
    """Mean of x over the positions where mask is True (all valid response tokens of the batch)."""
    return masked(x, mask).sum() / mask.sum().clamp(min=1).to(x.dtype)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2):
    """Minus the clipped surrogate of §4, averaged over the valid response tokens of the batch.

    logprobs, old_logprobs (B, T); advantages (B,), one per sequence, applied to each of its tokens;
    mask (B, T) bool. -> scalar."""
    ratio = torch.exp(masked(logprobs - old_logprobs, mask))  # r_t, (B, T)
    A = advantages[:, None]  # (B, 1)
    surrogate = torch.minimum(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    return -masked_mean(surrogate, mask)


def pg_loss(logprobs, advantages, mask):
    """REINFORCE with a baseline (§4): minus log pi(y_t) * A, averaged over valid tokens. Its
    gradient equals PPO's when the ratio is 1 and nothing clips."""
    return -masked_mean(logprobs * advantages[:, None], mask)


def value_loss(values, returns):
    """Squared error of V(x) to each candidate's reward: (B,), (B,) -> scalar."""
    return ((values - returns) ** 2).mean()


def group_baseline(rewards, num_samples):
    """For each candidate, the mean reward of the other N-1 candidates of its prompt (leave-one-out,
    as in RLOO). rewards (B*N,) with prompt b's candidates at rows b*N .. b*N+N-1 -> (B*N,)."""
    per_prompt = rewards.view(-1, num_samples)  # (B, N)
    return ((per_prompt.sum(1, keepdim=True) - per_prompt) / (num_samples - 1)).flatten()


def advantage(returns, values, baseline: str, num_samples: int):
    """A = R - b(x), §4: one sequence-level advantage per candidate, applied to each of its tokens
    (no GAE, no per-token value; DECISIONS.md §4). returns (B*N,) R minus the KL penalty; values
    (B*N,) V_old(x) repeated over the N candidates. b(x) is V_old(x) for baseline "value", the mean
    return of the prompt's other N-1 candidates for "group", 0 for "none". -> (B*N,)"""
    if baseline == "value":
        return returns - values
    if baseline == "group":
        return returns - group_baseline(returns, num_samples)
    return returns.clone()


def whiten(x, eps=1e-8):
    """(x - mean) / std over the whole batch."""
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def kl_to_reference(logprobs, ref_logprobs, mask):
    """Per-sequence KL estimate to the SFT policy: the sum over response tokens of the k1 estimate
    log pi(y_t) - log pi_sft(y_t) (InstructGPT). (B, T) x2, (B, T) -> (B,)."""
    return masked(logprobs - ref_logprobs, mask).sum(-1)


def k3_kl(logprobs, ref_logprobs, mask):
    """The k3 estimate of KL(pi || pi_ref) per token, exp(d) - 1 - d with d = log pi_ref - log pi:
    non-negative, unbiased, and differentiable in logprobs. Averaged over valid tokens -> scalar."""
    d = masked(ref_logprobs - logprobs, mask)
    return masked_mean(torch.exp(d) - 1 - d, mask)


def approx_kl(logprobs, old_logprobs, mask):
    """How far an update moved the policy from the one that sampled: the k3 estimate of
    KL(pi_old || pi) on pi_old's samples, (r_t - 1) - log r_t averaged over valid tokens (the
    `approx_kl` of PPO implementations) -> scalar."""
    return k3_kl(old_logprobs, logprobs, mask)


def clip_fraction(logprobs, old_logprobs, mask, clip_eps):
    """Share of valid tokens whose ratio lies outside [1 - eps, 1 + eps]."""
    return masked_mean(
        (masked(logprobs - old_logprobs, mask).exp() - 1).abs().gt(clip_eps).float(), mask
    )


def explained_variance(predicted, target):
    """1 - Var(target - predicted) / Var(target): 1 is a perfect V(x), 0 no better than
    a constant."""
    var = target.var(unbiased=False)
    return float("nan") if var == 0 else float(1 - (target - predicted).var(unbiased=False) / var)


def mean_entropy(logits, mask, temperature=1.0):
    """Mean entropy of softmax(logits / temperature) over valid tokens (the entropy bonus):
    (B, T, V), (B, T) -> scalar. Per token: sampling.token_entropy."""
    return masked_mean(token_entropy(logits.float() / temperature), mask)


class AdaptiveKLController:
    """Ziegler et al. (2019): raise the KL coefficient when the measured KL is above target, lower
    it when below, by at most 20% of the error per horizon."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * n_samples / self.horizon
        return self.coef


def whiten_across_ranks(x, eps=1e-8):
    """`whiten` with the mean and (biased) standard deviation of the whole batch, every rank's shard
    together (two all-reduced passes: sum and count, then the squared deviations)."""
    if parallel.rank_and_world()[1] == 1:
        return whiten(x, eps)
    total = parallel.all_sum(
        torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device, dtype=x.dtype)])
    )
    mean = total[0] / total[1]
    var = parallel.all_sum(((x - mean) ** 2).sum().reshape(1))[0] / total[1]
    return (x - mean) / (var.sqrt() + eps)


# --------------------------------------------------------------------------------------------
# One iteration: collect a rollout (§5), then update.
# --------------------------------------------------------------------------------------------


class PolicyValue(nn.Module):
    """The policy's teacher-forced logits and V(x) in one forward pass: the PPO update's only
    gradient-carrying call, so DistributedDataParallel (which hooks the backward of `forward`) can
    wrap it. value_only: V(x) on detached encoder states, the value warm-up; no logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src, src_mask, tgt_in, num_samples, value_only=False):
        memory = self.model.encode(src, src_mask)  # (B, S, D)
        if value_only:
            return None, self.model.value(memory.detach(), src_mask)  # None, (B,)
        logits, _ = self.model.decode(
            memory, src_mask, tgt_in, num_samples=num_samples
        )  # (B*N, T, V)
        return logits, self.model.value(memory, src_mask)  # (B*N, T, V), (B,)


@dataclass
class Experience:
    """Everything an update needs from one rollout of B prompts x N candidates."""

    src: torch.Tensor  # (B, S)
    src_mask: torch.Tensor  # (B, S)
    tokens: torch.Tensor  # (B*N, T)
    tgt_in: torch.Tensor  # (B*N, T) [start] + tokens[:-1], the decoder input that predicts them
    mask: torch.Tensor  # (B*N, T)
    old_logprobs: torch.Tensor  # (B*N, T) log pi_old(y_t), as sampled
    ref_logprobs: torch.Tensor  # (B*N, T) log pi_sft(y_t)
    returns: torch.Tensor  # (B*N,) R - kl_coef * KL: the target of V(x)
    advantages: torch.Tensor  # (B*N,)
    values: torch.Tensor  # (B*N,) V_old(x), repeated over the N candidates
    terms: dict  # reward terms per candidate, each (B*N,)


def decoder_input(tokens, start_id: int):
    """[start] + y[:-1]: the teacher-forced decoder input that predicts `tokens` (start: BOS, or pad
    for T5; data.Specials.start). (B, T) -> (B, T)."""
    return torch.cat([torch.full_like(tokens[:, :1], start_id), tokens[:, :-1]], dim=1)


@torch.no_grad()
def score_rollout(model, src, src_mask, rollout, salient, reward_cfg: RewardConfig, sp) -> dict:
    """The attention reward's terms (§3.2) of sampled candidates (B*N of them, N per prompt of
    src), their lengths and their prompt share (the attention on the prompt before Abar is
    renormalised over it: 1 for cross-attention, DECISIONS.md §10): a dict of (B*N,) tensors."""
    N = rollout.tokens.size(0) // src.size(0)
    rep = lambda x: x.repeat_interleave(N, dim=0)  # (B, S) -> (B*N, S)
    sinks = model.sinks(src, src_mask, sp.special)  # (B, S): never salient
    terms = compute_reward(
        rollout.attn,
        rollout.tokens,
        rollout.mask,
        rep(salient(src, src_mask, reward_cfg, sinks)),
        reward_cfg,
        special=rep(sinks),
        prompt_mask=rep(src_mask),
    )
    terms["length"] = rollout.mask.sum(-1).float()
    terms["prompt_share"] = response_mean(rollout.prompt_share, rollout.mask)
    return terms


@torch.no_grad()
def sample_and_score(
    model,
    src,
    src_mask,
    salient: SalientTokens,
    reward_cfg: RewardConfig,
    cfg: PPOConfig,
    sp: data.Specials,
    generator=None,
    num_samples=None,
    reward_fn=None,
):
    """Sample candidates with the recorded Abar and compute the reward of §3.2.

    reward_fn(src, src_mask, rollout, terms) -> (B*N,), when given, replaces the attention reward
    as terms["reward"] (the preference baselines of §7.3, the rival rewards of
    experiments/baselines.py); it sees the whole sampling.Rollout (tokens, mask, log-probs, the
    per-token self-certainty and entropy, Abar) and the attention reward's terms. The attention
    reward is then kept as terms["attention_reward"], so every method's rollouts are measured on
    the same terms.
    sp: the tokenizer's special ids (start, EOS, pad, the sinks).
    Returns (Rollout, terms dict of (B*N,) tensors, seconds spent sampling, seconds on
    the reward)."""
    N = num_samples or cfg.num_samples
    t0 = time.time()
    rollout = model.sample(
        src,
        src_mask,
        Decoding(
            num_samples=N,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
        ),
        generator=generator,
        **sp.sample_ids(),
    )
    t1 = time.time()
    terms = score_rollout(model, src, src_mask, rollout, salient, reward_cfg, sp)
    if reward_fn is not None:
        terms["attention_reward"] = terms["reward"]
        terms["reward"] = reward_fn(src, src_mask, rollout, dict(terms))
    return rollout, terms, t1 - t0, time.time() - t1


@dataclass(frozen=True)
class RLTask:
    """What an RL run needs about its task (§5): the prompts x it samples from, their tokenizer's
    special ids, and the reward R(x, y) its candidates are scored with."""

    prompts: list  # the encoded training prompts (`collect` reads none: it is given its batch)
    specials: data.Specials  # the prompts' tokenizer's special ids: start, EOS, pad, the sinks
    salient: SalientTokens  # the salient tokens of R's coverage term (§3.2)
    reward_cfg: RewardConfig  # the terms and weights of the attention reward R (§3.2)
    reward_fn: Callable | None = None  # a reward in R's place (§7.3; `sample_and_score`); None: R


@torch.no_grad()
def collect(
    model,
    ref_model,
    src,
    src_mask,
    task: RLTask,
    cfg: PPOConfig,
    kl_coef: float,
    generator=None,
):
    """One rollout (§5, Figure 1): N candidates per prompt, their reward, the KL penalty to the SFT
    policy, and advantages A = R - b(x). src, src_mask: a batch of prompts; task: their special ids
    and the reward (task.reward_fn: see `sample_and_score`). Returns (Experience, timings in
    seconds)."""
    model.eval()  # dropout off during rollouts (Huang et al.)
    N, sp = cfg.num_samples, task.specials
    rollout, terms, sample_s, reward_s = sample_and_score(
        model,
        src,
        src_mask,
        task.salient,
        task.reward_cfg,
        cfg,
        sp,
        generator,
        reward_fn=task.reward_fn,
    )
    t1 = time.time()
    tgt_in = decoder_input(rollout.tokens, sp.start)
    ref_logits, _ = ref_model(src, src_mask, tgt_in, num_samples=N)
    ref_logprobs = masked(token_logprobs(ref_logits, rollout.tokens, cfg.temperature), rollout.mask)
    kl = kl_to_reference(rollout.logprobs, ref_logprobs, rollout.mask)  # (B*N,)
    returns = terms["reward"] - kl_coef * kl
    values = model.value(model.encode(src, src_mask), src_mask).repeat_interleave(
        N
    )  # V_old(x), (B*N,)
    advantages = advantage(returns, values, cfg.baseline, N)  # (B*N,)
    if cfg.whiten:
        advantages = whiten_across_ranks(advantages)  # the whole batch, all ranks
    terms["kl_ref"] = kl
    experience = Experience(
        src,
        src_mask,
        rollout.tokens,
        tgt_in,
        rollout.mask,
        rollout.logprobs,
        ref_logprobs,
        returns,
        advantages,
        values,
        terms,
    )
    return experience, dict(sample_s=sample_s, reward_s=reward_s, ref_s=time.time() - t1)


def policy_objective(logits, tokens, mask, experience: Experience, rows, v_loss, cfg: PPOConfig):
    """The loss of one minibatch: the PPO (or PG) policy loss, plus the value loss (baseline
    "value"), minus the entropy bonus, plus the k3 KL term. A term joins only when its
    coefficient is non-zero (0 * NaN is NaN). V(x) is trained only when it is the baseline: with
    the shared encoder, a value loss nobody uses would still move the policy's attention. Returns
    (loss, logged statistics)."""
    logprobs = token_logprobs(logits, tokens, cfg.temperature)  # (B*N, T)
    old, adv = experience.old_logprobs[rows], experience.advantages[rows]
    if cfg.algo == "ppo":
        p_loss = ppo_policy_loss(logprobs, old, adv, mask, cfg.clip_eps)
    else:
        p_loss = pg_loss(logprobs, adv, mask)
    entropy = mean_entropy(logits, mask, cfg.temperature)
    k3 = k3_kl(logprobs, experience.ref_logprobs[rows], mask)
    loss = p_loss
    if cfg.baseline == "value" and cfg.value_coef:
        loss = loss + cfg.value_coef * v_loss
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * entropy
    if cfg.kl_k3_coef:
        loss = loss + cfg.kl_k3_coef * k3
    with torch.no_grad():
        stats = dict(
            policy_loss=p_loss.item(),
            entropy=entropy.item(),
            approx_kl=approx_kl(logprobs, old, mask).item(),
            clipfrac=clip_fraction(logprobs, old, mask, cfg.clip_eps).item(),
            k3_kl=k3.item(),
        )
    return loss, stats


def update(
    model,
    optimizer,
    experience: Experience,
    cfg: PPOConfig,
    value_only=False,
    generator=None,
    policy=None,
) -> dict:
    """PPO epochs over one rollout (cfg.algo "pg": one epoch of REINFORCE steps, one per minibatch).

    value_only=True is the value warm-up: the loss is the value loss on detached encoder states, so
    only the value head moves and the policy is unchanged. A minibatch whose loss or gradient norm
    is not finite is skipped (never applied), counted in `skipped` and named in `skip_cause`
    ("loss", "gradient"); `applied` counts the optimizer steps taken. policy: the forward pass to
    differentiate, PolicyValue(model) by default; under torchrun, that wrapped in DDP (`train`)."""
    policy = PolicyValue(model) if policy is None else policy
    model.eval()  # dropout off during updates too
    B, N = experience.src.size(0), cfg.num_samples
    epochs = 1 if cfg.algo == "pg" else cfg.epochs
    stats = {
        k: []
        for k in (
            "policy_loss",
            "value_loss",
            "entropy",
            "approx_kl",
            "clipfrac",
            "grad_norm",
            "k3_kl",
        )
    }
    skipped, applied, causes = 0, 0, set()
    for _ in range(epochs):
        order = torch.randperm(B, generator=generator).to(experience.src.device)
        for mb in order.chunk(cfg.minibatches):
            rows = (
                mb[:, None] * N + torch.arange(N, device=mb.device)
            ).flatten()  # candidates of these prompts
            src, src_mask = experience.src[mb], experience.src_mask[mb]
            tokens, mask = experience.tokens[rows], experience.mask[rows]
            logits, values = policy(
                src, src_mask, experience.tgt_in[rows], N, value_only
            )  # (B*N, T, V), (B,)
            values = values.repeat_interleave(N)  # (B*N,)
            v_loss = value_loss(values, experience.returns[rows])
            if value_only:
                loss = v_loss
            else:
                loss, terms = policy_objective(logits, tokens, mask, experience, rows, v_loss, cfg)
                for k, v in terms.items():
                    stats[k].append(v)
            stats["value_loss"].append(v_loss.item())
            cause, norm = parallel.guarded_step(optimizer, loss, cfg.max_grad_norm)
            if cause is not None:
                skipped += 1
                causes.add(cause)
                continue
            stats["grad_norm"].append(norm.item())
            applied += 1
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out.update(skipped=skipped, applied=applied)
    if causes:
        out["skip_cause"] = " and ".join(sorted(causes))
    return out


# --------------------------------------------------------------------------------------------
# The loop (§5): rollout, update, repeat.
# --------------------------------------------------------------------------------------------


def check_enough_prompts(num_prompts: int, batch_size: int) -> None:
    """One RL iteration takes `batch_size` distinct training prompts: a ValueError when there
    are fewer."""
    if num_prompts < batch_size:
        raise ValueError(
            f"{num_prompts} training prompts, fewer than --prompts-per-iter {batch_size}; lower "
            f"--prompts-per-iter or give more data"
        )


def prompt_batches(
    prompts: list[list[int]],
    batch_size: int,
    seed: int,
    sp: data.Specials,
    rank: int = 0,
    world: int = 1,
    skip: int = 0,
):
    """Endless batches of B prompts, (src, src_mask), reshuffled every pass over the prompts.

    With `world` processes, every rank draws the same batch of B and keeps its own contiguous
    B / world of it: the shards of one iteration are disjoint and together are the batch.
    skip: start after that many batches (a resumed run), without collating them."""
    parallel.check_split("--prompts-per-iter", batch_size, world)
    check_enough_prompts(len(prompts), batch_size)
    shard = batch_size // world
    per_pass = len(prompts) // batch_size
    epoch, skip_in_pass = divmod(skip, per_pass)
    while True:
        order = torch.randperm(
            len(prompts), generator=torch.Generator().manual_seed(seed + epoch)
        ).tolist()
        for i in range(skip_in_pass * batch_size, len(order) - batch_size + 1, batch_size):
            mine = order[i + rank * shard : i + (rank + 1) * shard]
            yield data.collate_prompts([prompts[j] for j in mine], sp)
        epoch, skip_in_pass = epoch + 1, 0


def iteration_metrics(experience: Experience, stats: dict, timings: dict, kl_coef: float) -> dict:
    """The per-iteration log row: reward and its terms, the PPO statistics, the KL to the
    SFT policy."""
    row = {k: float(v.mean()) for k, v in experience.terms.items()}
    row.update(stats)
    row["explained_variance"] = explained_variance(experience.values, experience.returns)
    row["kl_coef"] = kl_coef
    row.update({k: round(v, 3) for k, v in timings.items()})
    # the padded positions this process ran, prompts (B x S) and candidates (B*N x T), as floats
    # so that under torchrun the row holds their mean over the ranks, like every other float
    row["padded_prompt_tokens"] = float(experience.src.numel())
    row["padded_response_tokens"] = float(experience.tokens.numel())
    return row


def skipped_updates(history: list[dict]) -> int:
    """Minibatch updates skipped over a run (not finite: never applied), from `train`'s rows."""
    return sum(row.get("skipped", 0) for row in history)


def _streams(device, seed: int, cfg: PPOConfig, resume: dict | None):
    """(this rank's sampling stream, the minibatch-order stream, kl_coef, the first iteration): new
    from `seed`, or where a `train` state left them."""
    rank, world = parallel.rank_and_world()
    gen = torch.Generator(device=device).manual_seed(seed + 1_000_003 * rank)
    cpu_gen = torch.Generator().manual_seed(seed)
    if resume is None:
        return gen, cpu_gen, cfg.kl_coef, 0
    if len(resume["sample_rng"]) != world:
        raise ValueError(
            f"the checkpoint holds the sampling streams of {len(resume['sample_rng'])} processes; "
            f"resume it with the same number of processes, not {world}"
        )
    gen.set_state(resume["sample_rng"][rank])
    cpu_gen.set_state(resume["update_rng"])
    return gen, cpu_gen, resume["kl_coef"], resume["iteration"]


@dataclass(frozen=True)
class RLRun:
    """One run of `train`, beside the algorithm's settings (PPOConfig): how far it goes, where it
    starts, and how its update's forward executes."""

    iterations: int  # RL iterations in all, those of the run a `resume` continues included
    seed: int = 0  # the seed of the prompt order and of the sampling and minibatch streams
    resume: dict | None = None  # a `state` given to on_iteration: go on from there; None: anew
    compile: bool = False  # the update's forward through torch.compile


@dataclass(frozen=True)
class RLHooks:
    """What `train` calls as it goes, each optional."""

    on_iteration: Callable | None = None  # on_iteration(i, row, state) after every iteration
    stop: Callable | None = None  # stop() -> True ends the loop (Ctrl-C)
    progress: object = None  # a tqdm bar, advanced once per iteration


def train(
    model,
    ref_model,
    optimizer,
    task: RLTask,
    cfg: PPOConfig,
    run: RLRun,
    hooks: RLHooks = RLHooks(),
) -> list[dict]:
    """CAGSR's RL stage (§5, Figure 1), up to `run.iterations` in all: per iteration, sample N
    candidates for each of prompts_per_iter prompts while recording the cross-attention, compute R,
    the advantages and the PPO update (the first cfg.value_warmup iterations fit only V(x)).

    task: the encoded training prompts, their tokenizer's special ids and the reward;
    task.reward_fn: a reward instead of the attention reward (§7.3, see `sample_and_score`).
    hooks.on_iteration(i, row, state) runs after every iteration; `state` (the iteration, random
    streams, kl_coef) passed back as run.resume continues the run exactly. hooks.stop(): True ends
    the loop (Ctrl-C). hooks.progress: a tqdm bar. run.compile: the update's forward through
    torch.compile.

    Nothing non-finite reaches the weights: a rollout with a non-finite reward is not used, a
    minibatch with a non-finite loss or gradient is skipped (`update`), and MAX_BAD iterations in a
    row without an applied step raise NonFiniteError. Under torchrun each rank samples its shard
    with its own stream, advantages are whitened over all ranks, the ranks skip together, DDP
    averages the gradients and logged floats are means over ranks. Returns the metric rows."""
    check_on_policy(cfg)
    device = next(model.parameters()).device
    rank, world = parallel.rank_and_world()
    gen, cpu_gen, kl_coef, start = _streams(device, run.seed, cfg, run.resume)
    history = []
    batches = prompt_batches(
        task.prompts, cfg.prompts_per_iter, run.seed, task.specials, rank, world, skip=start
    )
    # DDP must be told when a parameter gets no gradient: the encoder and decoder in the value
    # warm-up, the value head when V(x) is not the baseline (its loss then joins no update).
    unused = cfg.value_warmup > start or not (cfg.baseline == "value" and cfg.value_coef)
    policy = parallel.data_parallel(PolicyValue(model), device, find_unused_parameters=unused)
    policy = torch.compile(policy) if run.compile else policy  # the update's forward only
    kl = AdaptiveKLController(kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else None
    bad = 0
    for i in range(start, run.iterations):
        src, src_mask = (t.to(device) for t in next(batches))
        experience, timings = collect(model, ref_model, src, src_mask, task, cfg, kl_coef, gen)
        warmup = i < cfg.value_warmup
        t0 = time.time()
        if parallel.all_finite(experience.returns):
            stats = update(
                model,
                optimizer,
                experience,
                cfg,
                value_only=warmup,
                generator=cpu_gen,
                policy=policy,
            )
        else:
            n_bad = int(parallel.all_sum((~torch.isfinite(experience.returns)).sum()))
            stats = dict(
                skipped=1,
                applied=0,
                nonfinite_reward=n_bad,
                skip_cause=(
                    f"reward (not finite for {n_bad} of {experience.returns.numel() * world} "
                    "candidates)"
                ),
            )
        timings["update_s"] = time.time() - t0
        row = dict(
            stage="rl",
            iteration=i + 1,
            value_warmup=warmup,
            **iteration_metrics(experience, stats, timings, kl_coef),
        )
        row = parallel.mean_over_ranks(row)
        if kl is not None and not warmup:
            kl_coef = kl.update(row["kl_ref"], experience.tokens.size(0))
        history.append(row)
        if hooks.progress is not None:
            hooks.progress.update(1)
            hooks.progress.set_postfix(
                reward=f"{row['reward']:.3f}", kl=f"{row['kl_ref']:.2f}", refresh=False
            )
        if hooks.on_iteration is not None:
            hooks.on_iteration(
                i + 1,
                row,
                dict(
                    iteration=i + 1,
                    sample_rng=parallel.all_gather_states(gen),
                    update_rng=cpu_gen.get_state(),
                    kl_coef=kl_coef,
                ),
            )
        bad = bad + 1 if stats["applied"] == 0 and stats["skipped"] > 0 else 0
        if bad >= MAX_BAD:
            raise NonFiniteError(
                f"RL iterations {i + 2 - bad}-{i + 1}: no update applied, {bad} iterations in a "
                f"row; the {stats['skip_cause']} was not finite. Nothing non-finite reached the "
                "weights. Lower --lr, check the reward settings (--alpha/--beta/--gamma, "
                "--attn-temperature), or resume from the last checkpoint with other settings."
            )
        if hooks.stop is not None and hooks.stop():
            break
    return history
