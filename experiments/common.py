"""What both experiment runners share (experiments/table1.py, the paper's Table 1;
experiments/reward_study.py, which internal reward): ExperimentConfig, the work directory bound to
its settings, the splits, tokenizer and relevance classifier made once per dataset, each seed's SFT
policy, the seeds computed in worker processes (--workers), and writing tables and figures. Neither
runner imports the other.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import parallel
from cli import runs
from decoder import build_policy, policy_config
from experiments import evaluation
from experiments.evaluation import PairScorer
from model import config_for
from reward import SalientTokens
from sft import SFTConfig, SFTRun, SFTTask, train_sft

# --------------------------------------------------------------------------------------------
# Settings: the experiment's config, and its work directory bound to the rows' settings
# --------------------------------------------------------------------------------------------


@dataclass
class ExperimentConfig:
    """What `--experiment` runs besides the run's own configs (settings.resolve builds it)."""

    name: str = "table1"
    seeds: int = 3
    """Seeds --seed, --seed+1, ...: one SFT model each."""
    results_dir: str = "results"
    """Where the .md, .json and .png tables go."""
    work_dir: str | None = None
    """Where each row's result is kept (default runs/table1-<dataset>-<size>)."""
    rm_steps: int = 300
    """Training steps of each baseline reward model."""
    human_prompts: int = 1000
    """Training prompts the simulated annotators compare two SFT samples on (§7.3: 1,000)."""
    relevance_steps: int = 600
    """Training steps of the relevance classifier."""
    hybrid_weight: float = 1.0
    """rewards: the weight of the preference reward model in the hybrid reward
    (attention + weight x RM)."""
    workers: int = 1
    """Seeds computed at once, each in its own process (on a CPU, the threads are shared out
    among them)."""
    split: str = "test"
    """rank: the held-out split its prompts come from (val: for choosing settings)."""


def check_settings(work: Path, settings: dict) -> None:
    """A work directory belongs to one set of settings: refuse to mix rows computed under others."""
    path = work / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise runs.UsageError(
                f"{work} holds rows computed with other settings (differs in: {', '.join(diff)}). "
                f"Pass --out DIR for a new table, or delete {work} to recompute this one."
            )
    else:
        write_json(path, settings)


def write_json(path: Path, obj) -> None:
    runs.write_text(path, json.dumps(obj, indent=1))


def rl_settings(run) -> dict:
    """The RL and evaluation settings every row of a rewards study depends on."""
    return dict(
        iterations=run.iterations,
        num_eval=run.num_eval,
        eval_every=run.eval_every,
        eval_prompts=run.eval_prompts,
        ppo=asdict(run.ppo),
        reward=asdict(run.reward),
    )


def work_dir(run, kind: str) -> Path:
    """The experiment's work directory: --out, else runs/<kind>-<dataset>-<size> from scratch,
    runs/<kind>-<dataset>-<model> from --init (made by shared_setup)."""
    experiment = run.experiment
    if experiment.work_dir:
        return Path(experiment.work_dir)
    if run.init is not None:
        return Path("runs") / f"{kind}-{label(run.dataset, run.arch, run.init)}"
    return Path("runs") / f"{kind}-{label(run.dataset, run.arch)}-{run.size}"


def label(dataset: str, arch: str, init=None) -> str:
    """The tables' and work directories' names: the dataset's name, and "-decoder" for the
    decoder-only policy (the encoder-decoder's have no suffix); from --init, the dataset's name
    and the model's (model_label)."""
    if init is not None:
        return f"{data.dataset_name(dataset)}-{model_label(init)}"
    return data.dataset_name(dataset) + ("-decoder" if arch == "decoder" else "")


def model_label(init) -> str:
    """The model a table starts from, in its name: a snapshot's or GGUF file's name in lower case,
    up to its first dot (SmolLM2-135M-Instruct.Q4_1.gguf: smollm2-135m-instruct); a checkpoint's
    size and architecture (tiny, tiny-decoder)."""
    path = Path(init)
    if runs.is_snapshot(path):
        return path.name.split(".")[0].lower()
    ckpt = runs.peek_checkpoint(path, "--init")
    arch = ckpt.get("model_config", {}).get("arch", "encoder-decoder")
    return ckpt["size"] + ("-decoder" if arch == "decoder" else "")


def arch_setting(run) -> dict:
    """{"arch": "decoder"} for a decoder-only experiment, for its settings.json; nothing for the
    encoder-decoder, whose settings.json has no "arch" field."""
    return {"arch": run.arch} if run.arch == "decoder" else {}


# --------------------------------------------------------------------------------------------
# Once per dataset: splits, tokenizer, relevance classifier; once per seed: SFT
# --------------------------------------------------------------------------------------------


def relevance_classifier(work: Path, tok, splits, cfg, settings, device):
    """The relevance classifier of §7.4 (trained once per dataset on the validation split, frozen)
    and its held-out statistics; read from work/relevance.pt when an earlier call wrote it."""
    clf_cfg = config_for(
        "tiny",
        vocab_size=tok.get_vocab_size(),
        max_src_len=cfg.max_src_len,
        max_tgt_len=cfg.max_tgt_len,
    )
    clf_path = work / "relevance.pt"
    if clf_path.exists():
        saved = torch.load(clf_path, map_location=device, weights_only=False)
        classifier = PairScorer(clf_cfg).to(device)
        classifier.load_state_dict(saved["model"])
        clf_stats = saved["stats"]
    else:
        t0 = time.time()
        classifier = evaluation.train_relevance(
            tok, splits.val, clf_cfg, device, steps=settings["relevance_steps"]
        )
        clf_stats = evaluation.relevance_accuracy(classifier, tok, splits.test, device)
        clf_stats.update(
            parameters=sum(p.numel() for p in classifier.parameters()),
            seconds=round(time.time() - t0, 1),
            trained_on=f"{len(splits.val)} validation prompts",
            steps=settings["relevance_steps"],
        )
        runs.atomic_save(clf_path, dict(model=classifier.state_dict(), stats=clf_stats))
    classifier.eval().requires_grad_(False)
    print(
        f"relevance classifier: held-out pairwise {clf_stats['pairwise']:.1%}, "
        f"accuracy {clf_stats['accuracy']:.1%} ({len(splits.test)} test prompts)"
    )
    return classifier, clf_stats


@dataclass
class Shared:
    """What every seed of an experiment shares: the splits, the tokenizer (trained once, kept in the
    work directory), the model config, the encoded training pairs, the salient tokens and the
    relevance classifier with its held-out statistics."""

    name: str
    splits: object
    tok: object
    cfg: object
    train_pairs: list  # clean: RL's prompts, the oracle's references
    sft_pairs: list  # what SFT trains on: with --sft-noise, a share made wrong
    salient: SalientTokens
    classifier: PairScorer | None  # None from a pretrained model
    clf_stats: dict | None
    start_state: dict | None = None  # a pretrained model's weights: every row's start


def shared_setup(run, work: Path, settings: dict, device) -> Shared:
    """The splits, tokenizer, encoded pairs, salient tokens and relevance classifier of an
    experiment (`work` holds the tokenizer and classifier, so a later call reuses them). The data
    are checked before anything is written; then the work and results directories are made and
    `work` is bound to `settings` (check_settings)."""
    dataset, size = run.dataset, run.size
    try:
        splits = data.load_dataset(dataset, seed=run.seed)
    except ValueError as e:
        raise SystemExit(f"--dataset {dataset}: {e}") from None
    tok_path = work / "tokenizer.json"
    if tok_path.exists():
        tok = data.tokenizer_from_str(tok_path.read_text())
    else:
        tok = data.train_tokenizer(
            list(data.record_texts(splits.train)), policy_config(run.arch, size).vocab_size
        )
    cfg = policy_config(run.arch, size, vocab_size=tok.get_vocab_size())
    try:
        train_pairs = data.encode_records(tok, splits.train, cfg.max_src_len, cfg.max_tgt_len)
        sft_pairs = data.noisy_sft_pairs(
            tok,
            splits.train,
            train_pairs,
            run.sft_noise,
            run.seed,
            dataset,
            cfg.max_src_len,
            cfg.max_tgt_len,
        )[0]
        data.check_held_out(splits, tok, cfg.max_src_len, cfg.max_tgt_len)
    except ValueError as e:
        raise SystemExit(f"--dataset {dataset}: {e}") from None
    work.mkdir(parents=True, exist_ok=True)
    Path(run.experiment.results_dir).mkdir(parents=True, exist_ok=True)
    check_settings(work, settings)
    if not tok_path.exists():
        runs.write_text(tok_path, data.tokenizer_to_str(tok))
    salient = SalientTokens.build(tok, [p for p, _ in train_pairs])
    classifier, clf_stats = relevance_classifier(work, tok, splits, cfg, settings, device)
    return Shared(
        label(dataset, run.arch),
        splits,
        tok,
        cfg,
        train_pairs,
        sft_pairs,
        salient,
        classifier,
        clf_stats,
    )


def seed_sft_pairs(sh: Shared, settings: dict, seed: int) -> list:
    """What seed `seed`'s SFT trains on: with settings["sft_noise_draw"] == "per seed", the noisy
    pairs drawn with the seed itself, so that each seed's SFT policy learns its own wrong answers;
    otherwise (the earlier studies) the one draw of the data seed that every seed shares."""
    if settings.get("sft_noise_draw") != "per seed" or not settings["sft_noise"]:
        return sh.sft_pairs
    return data.noisy_sft_pairs(
        sh.tok,
        sh.splits.train,
        sh.train_pairs,
        settings["sft_noise"],
        seed,
        settings["dataset"],
        sh.cfg.max_src_len,
        sh.cfg.max_tgt_len,
    )[0]


def seed_sft(
    seed, sd: Path, settings, cfg, tok, splits, sft_pairs, salient, device
) -> tuple[dict, float]:
    """The SFT model of one seed (the No-RL row and every RL row's start), trained on `sft_pairs`
    (with --sft-noise, a share made wrong): (its weights, its seconds), read from sd/sft.pt when an
    earlier call wrote it."""
    sft_path = sd / "sft.pt"
    if sft_path.exists():
        sft_seconds = json.loads((sd / "sft.json").read_text())["seconds"]
        print(f"seed {seed} | SFT: done earlier ({sft_seconds:.0f} s)")
        return runs.load_checkpoint(sft_path, device)[0].state_dict(), sft_seconds
    runs.seed_everything(seed)
    model = build_policy(cfg).to(device)
    t0 = time.time()
    print(
        f"seed {seed} | SFT: {settings['sft_steps']} steps x {settings['sft_batch_size']}, "
        f"lr {settings['sft_lr']}"
    )
    sft_cfg = SFTConfig(
        steps=settings["sft_steps"],
        batch_size=settings["sft_batch_size"],
        lr=settings["sft_lr"],
        warmup=settings["warmup"],
        eval_every=max(1, settings["sft_steps"] // 3),
    )
    val_pairs = data.encode_records(tok, splits.val[:200], cfg.max_src_len, cfg.max_tgt_len)
    train_sft(
        model,
        SFTTask(sft_pairs, val_pairs, specials=data.specials(tok)),
        sft_cfg,
        device,
        SFTRun(seed=seed),
    )
    sft_seconds = time.time() - t0
    runs.save_checkpoint(
        sft_path,
        model,
        tok,
        salient.idf,
        size=settings["size"],
        dataset=settings["dataset"],
        stage="sft",
        seed=seed,
    )
    write_json(sd / "sft.json", dict(seconds=round(sft_seconds, 1)))
    return model.state_dict(), sft_seconds


# --------------------------------------------------------------------------------------------
# Seeds in worker processes (--workers)
# --------------------------------------------------------------------------------------------


def worker_processes(run) -> tuple[int, int]:
    """(processes computing seeds at once, torch threads in each) for --workers."""
    workers = min(run.experiment.workers, run.experiment.seeds)
    return workers, max(1, torch.get_num_threads() // workers)


def device_line(run, device) -> str:
    """Where an experiment ran, for its table: the device, its threads and the worker processes."""
    workers, threads = worker_processes(run)
    return (
        f"{device} ({threads} threads)"
        if workers == 1
        else f"{device} ({workers} worker processes at once, {threads} thread(s) each)"
    )


def seeds_in_workers(run, module: str, work: Path, seeds: list[int], device) -> None:
    """--workers N > 1: compute the seeds' rows in N processes at once. Each process runs
    `<module>.seed_worker` with its output in <work>/seed<s>/log.txt and writes its rows to the work
    directory, as one process would; the caller then reads them (its run_seed finds them on disk).
    Call after shared_setup, so that the tokenizer and the relevance classifier are on disk."""
    workers, threads = worker_processes(run)
    if workers <= 1:
        return
    logs = {s: work / f"seed{s}" / "log.txt" for s in seeds}
    print(
        f"seeds {', '.join(map(str, seeds))}: {workers} worker processes at once, "
        f"{threads} thread(s) each on a CPU (their output: {work}/seed<s>/log.txt)"
    )
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {
            pool.submit(_seed_worker, module, run, s, str(device), threads, logs[s]): s
            for s in seeds
        }
        with parallel.progress(total=len(seeds), desc="seeds", unit="seed") as bar:
            for job in as_completed(jobs):
                try:
                    job.result()
                except Exception as e:
                    raise SystemExit(
                        f"seed {jobs[job]} failed in its worker process: {e!r}; its output is in "
                        f"{logs[jobs[job]]}. Rows already written are kept: run the same command "
                        "again to continue"
                    ) from None
                bar.update()


def _seed_worker(module: str, run, seed: int, device: str, threads: int, log: Path) -> None:
    """One seed in a worker process (seeds_in_workers), its output in `log`. The worker ends when
    the command's process does (killed or not), so no orphan goes on writing rows."""
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        importlib.import_module(module).seed_worker(run, seed, torch.device(device))


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def save_figure(fig, path: Path) -> None:
    """Lay out, save to a temporary file and rename over `path` (never half a .png), close."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_tables(result: dict, stem: str, md: str, plot_to, results_dir, work: Path) -> Path:
    """<results_dir>/<stem>.json, .md and .png (plot_to(result, path) draws the figure), each
    written whole, then the table printed: the path of the .md."""
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / f"{stem}.json", result)
    runs.write_text(results / f"{stem}.md", md)
    plot_to(result, results / f"{stem}.png")
    print("\n" + md)
    print(f"wrote {results / f'{stem}.md'}, .json, .png | work directory {work}")
    return results / f"{stem}.md"
