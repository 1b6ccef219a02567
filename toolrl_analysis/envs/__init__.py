"""Tool-use environments: records, the five-stage build pipeline, the sandbox and the reward."""
