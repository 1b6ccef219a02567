"""What training changed: checkpoint diffs, ablations, activation probes and plots."""
