"""The experiments of §7.3-§7.6 and the measures they use: evaluation.py (exact match, ROUGE-L,
relevance, the before/after report), baselines.py (the rival rewards and the controls),
table1.py (Table 1), reward_study.py (which internal reward sees correctness), stats.py
(intervals over seeds), common.py (what both experiments share: seeds, workers, the shared SFT
models)."""
