"""What spans runs: cell identity and skip-completed, sweep files, dry run, status/wait, the Slurm launcher."""
