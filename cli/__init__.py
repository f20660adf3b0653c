"""The command line's plumbing behind cagsr.py: cli/settings.py resolves and checks the flags into one
`Run`, cli/stages.py runs the stages (SFT, RL, sample, eval, export), cli/runs.py holds what every run
needs (devices, checkpoints, run directories, the metrics log, Ctrl-C)."""
