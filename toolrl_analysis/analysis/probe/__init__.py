"""`probe`: what the hidden states hold, layer by layer, in the base and the trained model.

- `decision_points`: the positions where a policy decides (call or answer, which tool, which response to
  read) in oracle and rollout conversations, with their labels and control labels;
- `activations`: hidden states and attention at those positions, from the hf, TransformerLens or nnsight
  backend;
- `fit`: batched logistic probes with environment-grouped splits, control tasks and paired comparisons;
- `attention`: the attention mass on each region of the context, per block and head;
- `run`: the command (`run_probe`, `ProbeConfig`, `ProbeReport`); `plots`: its figures.
"""

from toolrl_analysis.analysis.probe.run import ProbeConfig, ProbeReport, render_probe, run_probe

__all__ = ["ProbeConfig", "ProbeReport", "render_probe", "run_probe"]
