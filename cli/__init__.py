"""The command line's plumbing behind cagsr.py: settings.py resolves and checks the flags into
one `Run`, stages.py runs the stages (SFT, RL, sample, eval, export), runs.py holds what every
run needs (devices, checkpoints, run directories, the metrics log, Ctrl-C), plan.py the memory
plan of `--dry-run`."""
