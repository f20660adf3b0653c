"""The rewards study from a pretrained model (`--experiment rewards --init MODEL`;
results/README.md, "A pretrained model"): the model itself is every row's start, with no SFT. Its
own mix of right and wrong answers is the headroom. The rows are the start, the attention reward,
the attention variant that ranks best in the model's rank table (experiments/rank.py, written
first), self-certainty, and the random and oracle controls. Correctness is by key spans
(DECISIONS.md §13). The rows, the PPO runs and the summary over seeds are reward_study.py's; this
module holds the settings, the setup from --init, and the tables:

    python cagsr.py --experiment rank --init $GGUF --seeds 2 --temperature 0.5 --max-new-tokens 32
    python cagsr.py --experiment rewards --init $GGUF --seeds 2 --workers 2 --iterations 10 ...

(the whole CPU command is in results/README.md; `gpu_command` gives the paper's scale).
"""

from __future__ import annotations

import json
from pathlib import Path

from cli import stages
from experiments import evaluation, reward_study, reward_tables
from experiments.common import Shared, check_settings, label, rl_settings, work_dir
from reward import SalientTokens


def pretrained_settings(run) -> dict:
    """The settings of the study from a pretrained model: no SFT, no reward model; correctness by
    key spans (DECISIONS.md §13); the variant row's signal from the rank table."""
    return dict(
        study="rewards",
        init=str(run.init),
        dataset=run.dataset,
        data_seed=run.seed,
        **rl_settings(run),
        correctness=evaluation.correctness_name(run.dataset, pretrained=True),
        variant=ranked_variant(run),
        chat_template=run.args.get("chat_template"),
        system=run.args.get("system"),
        last_layers=run.model_overrides.get("last_layers"),
    )


def ranked_variant(run) -> str:
    """The attention variant that ranks best in this model's rank table (--experiment rank with
    the same --init, written first)."""
    path = Path(run.experiment.results_dir) / f"rank_{label(run.dataset, run.arch, run.init)}.json"
    if not path.exists():
        raise SystemExit(
            f"--experiment rewards --init {run.init}: its variant row is the attention variant "
            f"that ranks best in {path}, which is missing; run --experiment rank with the same "
            "--init and --dataset first"
        )
    variant = json.loads(path.read_text())["best_variant"]
    if variant is None:
        raise SystemExit(
            f"{path}: no prompt had both right and wrong candidates, so no variant ranks anything "
            "and the variant row cannot be chosen; rank with more prompts (--num-eval) or "
            "candidates (--num-samples)"
        )
    return variant


def gpu_command(run) -> str:
    """The study at the paper's scale (the pretrained profile: presets.RL_PROFILES), for a GPU."""
    return (
        f"python cagsr.py --experiment rewards --init {run.init} --dataset {run.dataset} "
        f"--temperature {run.ppo.temperature} --max-new-tokens {run.ppo.max_new_tokens} "
        "--seeds 3 --device cuda --out runs/rewards-gpu --results-dir results/gpu"
    )


def pretrained_setup(run, work: Path, settings: dict, device) -> Shared:
    """What every seed of the pretrained study shares: the --init model's tokenizer (with its chat
    template), config and weights (every row's start), the splits, the encoded training prompts and
    their salient tokens (IDF from them, with the model's tokenizer); no relevance classifier
    (it needs the tiny presets' tokenizer). `work` is bound to `settings` (check_settings)."""
    setup = stages.prepare(run, device)
    work.mkdir(parents=True, exist_ok=True)
    Path(run.experiment.results_dir).mkdir(parents=True, exist_ok=True)
    check_settings(work, settings)
    return Shared(
        label(run.dataset, run.arch, run.init),
        setup.splits,
        setup.tok,
        setup.model.cfg,
        setup.train_pairs,
        setup.train_pairs,
        SalientTokens.from_idf(setup.tok, setup.idf),
        classifier=None,
        clf_stats=None,
        start_state=setup.model.state_dict(),
    )


def seed_worker(run, seed: int, device) -> None:
    """The rows of one seed, from the run alone (in a worker process of
    experiments.seeds_in_workers)."""
    settings = pretrained_settings(run)
    work = work_dir(run, "rewards")
    reward_study.run_seed(
        seed, work, settings, pretrained_setup(run, work, settings, device), device
    )


def run_rewards(run, device) -> int:
    """`--experiment rewards --init MODEL`: every row of every seed, then results/."""
    result, sh, work = reward_study.run_study(
        run, device, pretrained_settings(run), pretrained_setup, __name__
    )
    result["gpu_command"] = gpu_command(run)
    md = reward_tables.pretrained_markdown(result)
    reward_study.write_rewards_tables(
        result, sh.name, md, reward_tables.pretrained_plot, run.experiment.results_dir, work
    )
    return 0
