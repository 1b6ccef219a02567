#!/usr/bin/env bash
# FTRL's Reinforce++ run: run_grpo.sh with algorithm.adv_estimator=reinforce_plus_plus (same hyper-parameters).
set -euo pipefail
ALGO=reinforce_plus_plus exec bash "$(dirname "${BASH_SOURCE[0]}")/run_grpo.sh" "$@"
