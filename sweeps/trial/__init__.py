"""One trial: train with its knobs (in one process or over Ray Train workers) and score it."""
