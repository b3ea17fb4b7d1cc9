"""Reading the trade-off out of stored trials: intervals, selection, frontiers, trajectories, summaries."""
