"""What comes after a sweep: kept checkpoints and export, RL, regression runs, the reproduction study, reports."""
