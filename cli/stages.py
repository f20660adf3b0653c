"""The stages of a run (§5, Figure 1), as `python cagsr.py` wires them: `prepare` (the data, the
tokenizer and the model: new, a checkpoint or a pretrained snapshot), then SFT (the initial policy,
§7.2) and RL with the cross-attention reward (§3.2) and PPO (§4) under one run directory and
metrics log (`train_stages`), or `sample_stage` / `eval_stage` on a saved model. Each stage receives
the resolved `settings.Run`; the method itself is model.py, reward.py, ppo.py and sft.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

import data
import parallel
import ppo
from cli import runs, settings
from decoder import build_policy, policy_config
from experiments import baselines, evaluation
from experiments.evaluation import (
    REPORT_KEYS,
    candidates,
    evaluate_policy,
    format_candidate,
    greedy_scores,
    print_report,
)
from reward import SalientTokens
from sft import SFTHooks, SFTRun, SFTTask, train_sft


@dataclass
class Setup:
    """What the training and evaluation stages start from."""

    model: object  # model.EncoderDecoder or decoder.DecoderOnly
    tok: object
    specials: data.Specials  # the tokenizer's special ids
    idf: torch.Tensor  # (V,) over the training prompts, computed once per run (§3.2)
    splits: data.Splits
    train_pairs: list  # the clean training pairs: RL's prompts, the oracle's references
    sft_pairs: list  # what SFT trains on: train_pairs with --sft-noise's share made wrong
    corrupted: int  # how many SFT responses --sft-noise replaced
    resume: dict | None  # the --resume checkpoint


def _encode(run, tok, records, cfg):
    try:
        return data.encode_records(
            tok, records, cfg.max_src_len, cfg.max_tgt_len, truncate=run.truncate
        )
    except ValueError as e:
        raise SystemExit(f"--dataset {run.dataset}: {e}") from None


def _splits(run) -> data.Splits:
    try:
        return data.load_dataset(run.dataset, seed=run.seed)
    except ValueError as e:  # DataError included: it names the file and line
        raise SystemExit(f"--dataset: {e}") from None


def _checked_splits(run, splits: data.Splits, tok, cfg) -> data.Splits:
    """The splits with their held-out records checked before anything is written
    (data.check_held_out)."""
    try:
        splits, left_out = data.check_held_out(
            splits, tok, cfg.max_src_len, cfg.max_tgt_len, run.truncate
        )
    except data.DataError as e:
        raise SystemExit(f"--dataset {run.dataset}: {e}") from None
    for name, n in left_out.items():
        if n:
            print(f"--truncate: {n} over-long {name} records left out of evaluation")
    return splits


def snapshot_idf(run, prompts, vocab_size: int) -> torch.Tensor:
    """The IDF table of a run from a bare snapshot, which has none: from --dataset's
    training prompts."""
    print(
        f"IDF (§3.2): the snapshot has none; computed from --dataset {run.dataset}'s "
        f"{len(prompts)} training prompts with the snapshot's tokenizer"
    )
    return data.idf(prompts, vocab_size)


def new_model(run, splits, device):
    """A preset's fresh model and a tokenizer trained on the training split (rank 0's,
    under torchrun)."""
    rank, world = parallel.rank_and_world()
    target = run.model_overrides.get("vocab_size", policy_config(run.arch, run.size).vocab_size)
    tok = data.train_tokenizer(list(data.record_texts(splits.train)), target) if rank == 0 else None
    if world > 1:  # rank 0's tokenizer for all: the vocabularies must agree
        tok = data.tokenizer_from_str(
            parallel.broadcast_object(data.tokenizer_to_str(tok) if rank == 0 else None)
        )
    # A run's vocabulary is its tokenizer's; the preset's number is only the BPE target.
    overrides = {**run.model_overrides, "vocab_size": tok.get_vocab_size()}
    print(f"size {run.size} ({run.arch}) | overrides {overrides} | device {device}")
    return build_policy(policy_config(run.arch, run.size, **overrides)).to(device), tok


def prepare(run, device) -> Setup:
    """The model (--resume, --init or new), its tokenizer, the data and the IDF table."""
    runs.seed_everything(run.seed)
    ckpt = resume = None
    if run.resume_from is not None:  # the model and everything else from its checkpoint
        model, tok, resume = runs.load_checkpoint(
            run.resume_from, device, "--resume"
        )  # checked in main
        where = (
            f"step {resume['step']}"
            if resume["stage"] == "sft"
            else f"iteration {resume['iteration']}"
        )
        print(f"resuming {run.resume} from {run.resume_from.name} ({resume['stage']}, {where})")
        ckpt = resume
    elif run.init is not None:  # the model and tokenizer: a checkpoint's or a snapshot's
        model, tok, ckpt = runs.load_init(run.init, device, "--init", run.model_overrides)
        print(
            f"loaded {run.init}: stage {ckpt['stage']}, size {run.size}, "
            f"{model.num_params():,} parameters"
        )
    splits = _splits(run)
    if ckpt is None:
        model, tok = new_model(run, splits, device)
    data.with_chat(tok, run.chat)  # --chat-template, --system: every prompt below goes through it
    settings.print_profile(run)
    model.gradient_checkpointing = run.grad_checkpoint
    cfg = model.cfg
    print(
        f"dataset {run.dataset}: {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test pairs; "
        f"vocabulary {cfg.vocab_size}; model {model.num_params():,} parameters"
    )
    train_pairs = _encode(run, tok, splits.train, cfg)
    splits = _checked_splits(run, splits, tok, cfg)
    if run.stage in ("all", "rl"):
        try:
            ppo.check_enough_prompts(len(train_pairs), run.ppo.prompts_per_iter)
        except ValueError as e:
            raise SystemExit(f"{run.dataset}: {e}") from None
    sft_pairs, corrupted = sft_data(run, tok, splits.train, cfg, train_pairs)
    prompts = [p for p, _ in train_pairs]
    if ckpt is None or ckpt["idf"] is None:  # a new model, or a bare snapshot
        idf = (
            data.idf(prompts, cfg.vocab_size)
            if ckpt is None
            else snapshot_idf(run, prompts, cfg.vocab_size)
        )
    else:
        idf = ckpt["idf"]
    return Setup(
        model, tok, data.specials(tok), idf, splits, train_pairs, sft_pairs, corrupted, resume
    )


def sft_data(run, tok, records, cfg, train_pairs) -> tuple[list, int]:
    """SFT's training pairs: the clean ones, or with --sft-noise a seeded share made wrong
    (data.noisy_sft_pairs)."""
    try:
        pairs, corrupted = data.noisy_sft_pairs(
            tok,
            records,
            train_pairs,
            run.sft_noise,
            run.seed,
            run.dataset,
            cfg.max_src_len,
            cfg.max_tgt_len,
            run.truncate,
        )
    except ValueError as e:  # DataError included: it names the record
        raise SystemExit(f"--dataset {run.dataset}: {e}") from None
    if run.sft_noise:
        print(
            f"--sft-noise {run.sft_noise}: {len(corrupted)} of {len(records)} SFT training "
            "responses replaced by wrong ones; "
            "RL, evaluation and the oracle keep the clean references"
        )
    return pairs, len(corrupted)


def interrupted(run_dir, stage: str, where: str) -> int:  # Ctrl-C: the checkpoint is written
    print(
        f"\ninterrupted: {stage} stopped at {where}; checkpoint written. Continue with:\n"
        f"    python cagsr.py --resume {run_dir}"
    )
    return 130


def sft_stage(run, setup: Setup, device, run_dir, log, stop) -> int | None:
    """SFT (§7.2) with its checkpoints; then five held-out answers and the held-out exact-match.
    Returns 130 when Ctrl-C stopped it, else None."""
    rank, world = parallel.rank_and_world()
    cfg, resume = run.sft, setup.resume
    val_pairs = _encode(run, setup.tok, setup.splits.val, setup.model.cfg)
    print(f"SFT: {cfg.steps} steps x {cfg.batch_size} pairs, peak lr {cfg.lr}")
    probe_set = setup.splits.val[
        :200
    ]  # exact-match on a fixed validation subset: the SFT curve in USAGE.md

    def checkpoint(step, opt, complete=False):
        if rank == 0:
            runs.save_checkpoint(
                run_dir / "sft.pt",
                setup.model,
                setup.tok,
                setup.idf,
                size=run.size,
                dataset=run.dataset,
                stage="sft",
                optimizer=opt.state_dict(),
                step=step,
                steps=cfg.steps,
                complete=complete,
                args=run.args,
                rng=runs.rng_state(),
                log_rows=log.rows,
                world=world,
            )

    t0 = time.time()
    with runs.autocast(device, run.precision):
        result = train_sft(
            setup.model,
            SFTTask(setup.sft_pairs, val_pairs, specials=setup.specials),
            cfg,
            device,
            SFTRun(seed=run.seed, resume=resume, compile=run.compile),
            SFTHooks(
                log=log,
                probe=lambda m: dict(
                    val_exact_match=greedy_scores(m, setup.tok, probe_set, device)[1]
                ),
                on_checkpoint=checkpoint,
                stop=stop,
            ),
        )
    sft_seconds = time.time() - t0
    parallel.check_replicas(setup.model, "SFT")
    if result["stopped"]:
        return interrupted(run_dir, "SFT", f"step {result['steps']} of {cfg.steps}")
    checkpoint(result["steps"], result["optimizer"], complete=True)
    if rank == 0:
        test = setup.splits.test[: run.num_eval]
        preds, em, _ = greedy_scores(setup.model, setup.tok, test, device)
        print("\nSample answers on held-out test prompts (greedy):")
        for r, p in list(zip(test, preds))[:5]:
            print(f"  prompt:    {r['prompt']}\n  model:     {p}\n  reference: {r['response']}\n")
        log(
            dict(
                stage="sft_eval",
                exact_match=em,
                num_eval=len(test),
                sft_seconds=round(sft_seconds, 1),
                sft_noise=run.sft_noise,
                corrupted=setup.corrupted,
            )
        )
        print(
            f"after SFT: held-out exact-match {em:.1%} of {len(test)} test prompts | "
            f"SFT took {sft_seconds:.0f}s"
        )
    return None


def rl_reward(run, setup: Setup, sft_policy, device):
    """The RL task's reward_fn for --reward (ppo.RLTask; baselines.make_reward; None: the attention
    reward). The hybrid's preference reward model is fitted here first, on samples of the SFT policy
    (§7.3)."""
    rm = None
    if run.reward_name == "hybrid":
        h = run.hybrid
        rm, rm_stats = baselines.train_bt_rm(
            sft_policy,
            setup.tok,
            setup.splits.train,
            run.ppo,
            device,
            num_prompts=h["human_prompts"],
            steps=h["rm_steps"],
            seed=run.seed,
        )
        print(
            f"hybrid reward: attention + {h['weight']} x a Bradley-Terry reward model on "
            f"{rm_stats['pairs']} simulated preference pairs (not self-supervised)"
        )
        rm = rm.eval().requires_grad_(False)
    return baselines.make_reward(
        run.reward_name,
        tok=setup.tok,
        records=setup.splits.train,
        seed=run.seed,
        correct=evaluation.correctness_function(run.dataset, run.size == runs.PRETRAINED),
        rm=rm,
        hybrid_weight=run.hybrid.get("weight", 1.0),
    )


def rl_stage(run, setup: Setup, device, run_dir, log, stop) -> int | None:
    """CAGSR (§4, §5): the RL loop with the fixed-set evaluation every run.eval_every iterations,
    checkpoints, and the before/after report. Returns 130 when Ctrl-C stopped it, else None."""
    cfg, reward_cfg, model = run.ppo, run.reward, setup.model
    settings.print_rl_settings(cfg, reward_cfg, run.iterations, run.reward_name)
    resume = setup.resume if setup.resume is not None and setup.resume["stage"] == "rl" else None
    rank, world = parallel.rank_and_world()
    salient = SalientTokens.from_idf(setup.tok, setup.idf)
    ref_model, optimizer = runs.rl_start(
        model,
        resume["ref_model"] if resume else model.state_dict(),
        cfg.lr,
        device,
        resume["optimizer"] if resume else None,
    )
    reward_fn, correct = (
        rl_reward(run, setup, ref_model, device),
        evaluation.correctness_function(run.dataset, run.size == runs.PRETRAINED),
    )
    eval_set, test = setup.splits.val[: run.eval_prompts], setup.splits.test[: run.num_eval]
    state = (
        {**resume["train_state"], "iteration": resume["iteration"]}
        if resume and resume["train_state"]
        else None
    )
    last = dict(iteration=resume["iteration"] if resume else 0, state=state)
    report = dict(before=resume["before"], shown_before=resume["shown_before"]) if resume else {}

    def checkpoint(iteration, state):
        if rank == 0:  # rank 0 writes; every rank holds the same weights
            runs.save_checkpoint(
                run_dir / "rl.pt",
                model,
                setup.tok,
                setup.idf,
                size=run.size,
                dataset=run.dataset,
                stage="rl",
                optimizer=optimizer.state_dict(),
                ref_model=ref_model.state_dict(),
                iteration=iteration,
                iterations=run.iterations,
                ppo_config=asdict(cfg),
                reward_config=asdict(reward_cfg),
                kl_coef=state["kl_coef"] if state else cfg.kl_coef,
                train_state=state,
                **report,
                args=run.args,
                rng=runs.rng_state(),
                log_rows=log.rows,
                world=world,
            )

    def fixed_eval(iteration):
        row = dict(
            stage="rl_eval",
            iteration=iteration,
            **evaluate_policy(
                model, setup.tok, eval_set, salient, reward_cfg, cfg, device, correct=correct
            ),
        )
        log(row)
        tqdm.write(
            f"iter {iteration:4d} | fixed-set reward {row['reward']:+.4f} "
            f"(cov {row['coverage']:.3f} focus {row['focus']:+.3f} rep {row['repeat']:.3f}) | "
            f"sink {row['sink_share']:.3f} prompt {row['prompt_share']:.3f} | "
            f"EM {row['exact_match']:.1%} | ROUGE-L {row['rouge_l']:.3f} | "
            f"sampled T {cfg.temperature}: "
            f"correct {row['sampled_correct']:.1%}, pass@{cfg.num_samples} {row['pass_at_n']:.1%}"
        )

    def on_iteration(i, row, state):
        log(row)
        last.update(iteration=i, state=state)
        if rank == 0 and (i % run.eval_every == 0 or i == run.iterations):
            fixed_eval(i)
        if i % run.ckpt_every == 0:
            checkpoint(i, state)

    print(
        f"\nRL: {run.iterations} iterations x {cfg.prompts_per_iter} prompts x "
        f"{cfg.num_samples} candidates ({cfg.algo}, baseline {cfg.baseline}); "
        f"fixed evaluation set: {len(eval_set)} validation prompts"
    )
    if resume:
        print(f"resuming RL after iteration {last['iteration']} of {run.iterations}")
    elif rank == 0:  # evaluation is rank 0's; the others go on to the rollouts
        report = dict(
            before=evaluate_policy(
                model, setup.tok, test, salient, reward_cfg, cfg, device, correct=correct
            ),
            shown_before=candidates(
                model,
                setup.tok,
                [r["prompt"] for r in test[:3]],
                salient,
                reward_cfg,
                cfg,
                device,
                num_samples=2,
            ),
        )
        fixed_eval(0)
    t0 = time.time()
    with parallel.progress(
        total=run.iterations, initial=last["iteration"], desc="RL", unit="iter"
    ) as bar:
        ppo.train(
            model,
            ref_model,
            optimizer,
            ppo.RLTask(
                [p for p, _ in setup.train_pairs],
                specials=setup.specials,
                salient=salient,
                reward_cfg=reward_cfg,
                reward_fn=reward_fn,
            ),
            cfg,
            ppo.RLRun(run.iterations, seed=run.seed, resume=state, compile=run.compile),
            ppo.RLHooks(on_iteration=on_iteration, stop=stop, progress=bar),
        )
    rl_seconds = time.time() - t0
    parallel.check_replicas(model, "RL")
    checkpoint(last["iteration"], last["state"])
    if last["iteration"] < run.iterations:  # stopped by Ctrl-C
        return interrupted(run_dir, "RL", f"iteration {last['iteration']}")
    if rank == 0:
        rl_summary(run, setup, report, salient, test, eval_set, rl_seconds, run_dir, log, device)
    return None


def rl_summary(
    run, setup: Setup, report, salient, test, eval_set, rl_seconds, run_dir, log, device
) -> None:
    """After RL: the test prompts scored again, the before/after report, the summary row."""
    correctness = evaluation.correctness_name(run.dataset, run.size == runs.PRETRAINED)
    after = evaluate_policy(
        setup.model,
        setup.tok,
        test,
        salient,
        run.reward,
        run.ppo,
        device,
        correct=evaluation.correctness_function(run.dataset, run.size == runs.PRETRAINED),
    )
    shown_after = candidates(
        setup.model,
        setup.tok,
        [r["prompt"] for r in test[:3]],
        salient,
        run.reward,
        run.ppo,
        device,
        num_samples=2,
    )
    print_report(
        report["before"],
        after,
        report["shown_before"],
        shown_after,
        len(test),
        run.ppo.num_samples,
        correctness,
    )
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = next(r for r in logged if r["stage"] == "rl_eval"), logged[-1]
    print(
        f"fixed validation set ({len(eval_set)} prompts): "
        f"reward {first['reward']:+.4f} -> {last['reward']:+.4f}"
    )
    skipped = ppo.skipped_updates([row for row in logged if row["stage"] == "rl"])
    log(
        dict(
            stage="rl_summary",
            iterations=run.iterations,
            rl_seconds=round(rl_seconds, 1),
            skipped_updates=skipped,
            reward_name=run.reward_name,
            temperature=run.ppo.temperature,
            sft_noise=run.sft_noise,
            correctness=correctness,
            num_samples=run.ppo.num_samples,
            **{f"before_{k}": report["before"][k] for k in REPORT_KEYS},
            **{f"after_{k}": after[k] for k in REPORT_KEYS},
        )
    )


def train_stages(run, setup: Setup, device, t_start: float) -> int:
    """--stage all|sft|rl: the run directory and metrics log, then SFT and/or RL under
    Ctrl-C handling."""
    rank = parallel.rank_and_world()[0]
    if rank == 0:
        run_dir = runs.make_run_dir(run.out, run.overwrite, run.size, run.dataset)
        if run.resume_from is None:
            runs.write_text(run_dir / "args.json", json.dumps(run.args, indent=2))
        log = runs.MetricsLog(
            run_dir / "metrics.jsonl", keep=setup.resume["log_rows"] if setup.resume else 0
        )
    else:  # under torchrun only rank 0 writes the run directory
        run_dir, log = None, runs.MetricsLog(None)
    if setup.resume is not None:
        runs.set_rng_state(setup.resume["rng"])
    code = None
    with runs.StopFlag() as stop:  # Ctrl-C from here on: checkpoint, then exit 130
        if run.stage in ("all", "sft") and not (setup.resume and setup.resume["stage"] == "rl"):
            code = sft_stage(run, setup, device, run_dir, log, stop)
        if code is None and run.stage in ("all", "rl"):
            with runs.autocast(device, run.precision):
                code = rl_stage(run, setup, device, run_dir, log, stop)
    if code is None:
        total = time.time() - t_start
        log(dict(stage="done", total_seconds=round(total, 1)))
        print(f"\ndone in {total / 60:.1f} min | run directory {run_dir}")
    log.close()
    return code or 0


def sample_stage(run, device) -> int:
    """--stage sample: N candidates per --prompt with their reward terms."""
    model, tok, ckpt = runs.load_init(run.init, device, "--init", run.model_overrides)
    data.with_chat(tok, run.chat)
    idf = ckpt["idf"]
    if idf is None:
        idf = snapshot_idf(
            run,
            [p for p, _ in _encode(run, tok, _splits(run).train, model.cfg)],
            model.cfg.vocab_size,
        )
    salient = SalientTokens.from_idf(tok, idf)
    for prompt in run.prompts:
        n = len(data.encode(tok, prompt))
        if n > model.cfg.max_src_len:
            raise SystemExit(
                f"--prompt is {n} tokens, over this model's max_src_len={model.cfg.max_src_len}"
            )
    for prompt, rows in candidates(
        model,
        tok,
        run.prompts,
        salient,
        run.reward,
        run.ppo,
        device,
        run.ppo.num_samples,
        seed=run.seed,
    ):
        print(f"prompt: {prompt}")
        for text, t in rows:
            print(f"  {format_candidate(text, t)}")
    return 0


def export_stage(run) -> int:
    """--stage export: the --init checkpoint (or snapshot) as a Hugging Face directory --out that
    transformers loads (interop/export.py): T5-family, Llama and Qwen2 layouts; a from-scratch
    encoder-decoder is refused with the reason."""
    from interop import export  # safetensors' writer only when exporting

    model, tok, _ = runs.load_init(run.init, "cpu", "--init", run.model_overrides)
    try:
        out = export.export(model, tok, data.specials(tok), run.out)
    except ValueError as e:
        raise SystemExit(f"--stage export --init {run.init}: {e}") from None
    print(
        f"exported {run.init} ({type(model).__name__}, {model.num_params():,} parameters with the "
        f"value head, which is not exported) to {out}: "
        f"{', '.join(sorted(p.name for p in out.iterdir()))}"
    )
    return 0


def eval_stage(run, setup: Setup, device) -> int:
    """--stage eval: the fixed evaluation set and the test prompts, scored (`evaluate_policy`)."""
    salient = SalientTokens.from_idf(setup.tok, setup.idf)
    for name, recs in (
        ("fixed validation set", setup.splits.val[: run.eval_prompts]),
        ("test", setup.splits.test[: run.num_eval]),
    ):
        res = evaluate_policy(
            setup.model,
            setup.tok,
            recs,
            salient,
            run.reward,
            run.ppo,
            device,
            correct=evaluation.correctness_function(run.dataset, run.size == runs.PRETRAINED),
        )
        print(
            f"{name} ({len(recs)} prompts): " + " | ".join(f"{k} {v:.4f}" for k, v in res.items())
        )
    return 0
