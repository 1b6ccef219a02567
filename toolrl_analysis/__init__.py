"""toolrl-analysis: build tool-use RL environments, train on them, and analyse what training changed."""

__version__ = "0.1.0"
