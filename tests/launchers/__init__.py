"""Launchers: example configs, Slurm scripts on a real Slurm, multi-node rehearsal."""
