"""Paper reproductions: one folder per paper with its README, run configs and small deltas."""
