"""The experiments of §7.3-§7.6 and the measures they use: experiments/evaluation.py (exact match, ROUGE-L,
relevance, the before/after report), experiments/baselines.py (the rival rewards and the controls), experiments/table1.py
(Table 1), experiments/reward_study.py (which internal reward sees correctness), experiments/stats.py (intervals over
seeds), common.py (what both experiments share: seeds, workers, the shared SFT models)."""
