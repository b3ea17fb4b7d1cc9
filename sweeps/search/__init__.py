"""The search: reference trials first, a space-filling start, Optuna samplers, warm starts, and pruning of kept weights."""
