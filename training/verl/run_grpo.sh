#!/usr/bin/env bash
# FTRL's RL recipe on verl (python3 -m verl.trainer.main_ppo), with toolrl_analysis's step reward.
# Written for verl 0.9 (the keys of its trainer configuration as of 0.9.1).
#
#   TRAIN_FILE=data/train.parquet MODEL=Qwen/Qwen2.5-7B-Instruct bash training/verl/run_grpo.sh [hydra.key=value ...]
#
# TRAIN_FILE / VAL_FILE: `toolrl-analyze envs export DIR --format verl --out FILE.parquet` output (or an EnvSet
# directory / JSONL). Unless PREPARE=0, each is first passed through prepare_data.py, which writes the rows'
# tool schemas into their prompts with MODEL's chat template (verl's dataset does not pass tools=).
# Hyper-parameters are the paper's (FTRL's Scripts/FTRL-GRPO-Qwen25.sh and FTRL-Reinforce++-Qwen25.sh). Those
# scripts leave loss_agg_mode, the rollout temperature and the clip ratios to the defaults of the verl FTRL ships
# (Code/verl/trainer/config/ppo_trainer.yaml: seq-mean-token-mean, 0.7, 0.2/0.2); today's verl defaults differ
# (token-mean, temperature 1.0), so they are set here explicitly. verl divides the logits by the rollout
# temperature for the old, new and reference log-probs alike, as toolrl-analyze train-grpo does.
# Arguments after the script are extra Hydra overrides; they come last, so they win.
#
# Environment (defaults in brackets):
#   ALGO [grpo]            grpo | reinforce_plus_plus (reinforce++ is accepted too)
#   MODEL                  policy: HF directory or hub id [Qwen/Qwen2.5-7B-Instruct]
#   TRAIN_FILE (required)  VAL_FILE [TRAIN_FILE; validation is off unless trainer.test_freq is set]
#   N_GPUS [8]  NNODES [1]  TP_SIZE [2] (vLLM tensor parallel size)
#   REWARD_VARIANT [f1]    f1 | precision | rate | pr  (picks compute_score_<variant> in reward.py)
#   KL_IN_REWARD [0]       0: k3 KL (low_var_kl) in the actor loss, FTRL's choice for both algorithms; 1 (Reinforce++
#                          only): k1 KL paid per token in the reward (use_kl_in_reward, kl_penalty=kl), no KL loss.
#                          train-grpo's kl_in_reward is the same switch.
#   ROLLOUT_MODE []        unset: verl's own default (async; verl >= 0.7 removed sync and raises on it)
#   OUT_DIR [checkpoints/toolrl/$EXPERIMENT]  PROJECT [toolrl-verl]  EXPERIMENT [ftrl-$ALGO]
#   LOGGER [[console]]     e.g. "['console','wandb']"
#   PREPARE [1]  PYTHON [python3]  DRY_RUN [0]: 1 prints the training command instead of running it
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

ALGO="${ALGO:-grpo}"
MODEL="${MODEL:-Qwen/Qwen2.5-7B-Instruct}"
TRAIN_FILE="${TRAIN_FILE:?set TRAIN_FILE to the parquet written by: toolrl-analyze envs export DIR --format verl --out FILE}"
VAL_FILE="${VAL_FILE:-$TRAIN_FILE}"
N_GPUS="${N_GPUS:-8}"
NNODES="${NNODES:-1}"
TP_SIZE="${TP_SIZE:-2}"
REWARD_VARIANT="${REWARD_VARIANT:-f1}"
KL_IN_REWARD="${KL_IN_REWARD:-0}"
ROLLOUT_MODE="${ROLLOUT_MODE:-}"
PROJECT="${PROJECT:-toolrl-verl}"
EXPERIMENT="${EXPERIMENT:-ftrl-${ALGO//+/p}}"
OUT_DIR="${OUT_DIR:-checkpoints/toolrl/$EXPERIMENT}"
LOGGER="${LOGGER:-[console]}"
PREPARE="${PREPARE:-1}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"

case "$ALGO" in
  grpo) ADV_ESTIMATOR=grpo ;;
  reinforce_plus_plus | reinforce++ | reinforce_pp) ADV_ESTIMATOR=reinforce_plus_plus ;;
  *) echo "error: ALGO must be grpo or reinforce_plus_plus, got '$ALGO'" >&2; exit 2 ;;
esac
case "$KL_IN_REWARD" in
  0) KL_SETTINGS=(algorithm.use_kl_in_reward=False actor_rollout_ref.actor.use_kl_loss=True
       actor_rollout_ref.actor.kl_loss_coef=0.001 actor_rollout_ref.actor.kl_loss_type=low_var_kl) ;;
  1) [[ "$ADV_ESTIMATOR" == reinforce_plus_plus ]] || {
       echo "error: KL_IN_REWARD=1 is for Reinforce++ (GRPO takes its KL as a loss)" >&2; exit 2; }
     KL_SETTINGS=(algorithm.use_kl_in_reward=True algorithm.kl_penalty=kl algorithm.kl_ctrl.kl_coef=0.001
       actor_rollout_ref.actor.use_kl_loss=False) ;;
  *) echo "error: KL_IN_REWARD must be 0 or 1, got '$KL_IN_REWARD'" >&2; exit 2 ;;
esac
case "$REWARD_VARIANT" in
  f1 | precision | rate | pr) ;;
  *) echo "error: REWARD_VARIANT must be f1, precision, rate or pr, got '$REWARD_VARIANT'" >&2; exit 2 ;;
esac

# Ray workers need not share this shell's directory: hand verl absolute paths.
absolute() { if [[ "$1" = /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$(pwd)" "$1"; fi; }
for source in "$TRAIN_FILE" "$VAL_FILE"; do
  [[ -e "$source" ]] || { echo "error: no such file: $source" >&2; exit 2; }
done
OUT_DIR="$(absolute "$OUT_DIR")"
if [[ -e "$MODEL" ]]; then MODEL="$(absolute "$MODEL")"; fi

if [[ "$PREPARE" == 1 ]]; then
  mkdir -p "$OUT_DIR/data"
  "$PYTHON" "$HERE/prepare_data.py" "$TRAIN_FILE" --tokenizer "$MODEL" --out "$OUT_DIR/data/train.parquet"
  if [[ "$VAL_FILE" == "$TRAIN_FILE" ]]; then
    VAL_FILE="$OUT_DIR/data/train.parquet"
  else
    "$PYTHON" "$HERE/prepare_data.py" "$VAL_FILE" --tokenizer "$MODEL" --out "$OUT_DIR/data/val.parquet"
    VAL_FILE="$OUT_DIR/data/val.parquet"
  fi
  TRAIN_FILE="$OUT_DIR/data/train.parquet"
fi
TRAIN_FILE="$(absolute "$TRAIN_FILE")"
VAL_FILE="$(absolute "$VAL_FILE")"

unset PYTORCH_CUDA_ALLOC_CONF
export VLLM_USE_V1=1

command=(
  "$PYTHON" -m verl.trainer.main_ppo
  algorithm.adv_estimator="$ADV_ESTIMATOR"
  algorithm.norm_adv_by_std_in_grpo=True
  "${KL_SETTINGS[@]}"
  data.train_files="$TRAIN_FILE"
  data.val_files="$VAL_FILE"
  data.prompt_key=prompt
  data.train_batch_size=512
  data.max_prompt_length=16384
  data.max_response_length=1024
  data.filter_overlong_prompts=True
  data.truncation=error
  actor_rollout_ref.model.path="$MODEL"
  actor_rollout_ref.model.use_remove_padding=True
  actor_rollout_ref.model.enable_gradient_checkpointing=True
  actor_rollout_ref.actor.optim.lr=1e-6
  actor_rollout_ref.actor.ppo_mini_batch_size=32
  actor_rollout_ref.actor.use_dynamic_bsz=True
  actor_rollout_ref.actor.ppo_max_token_len_per_gpu=32768
  actor_rollout_ref.actor.entropy_coeff=0.001
  actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean
  actor_rollout_ref.actor.clip_ratio_low=0.2
  actor_rollout_ref.actor.clip_ratio_high=0.2
  actor_rollout_ref.actor.ppo_epochs=1
  actor_rollout_ref.actor.fsdp_config.param_offload=False
  actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
  actor_rollout_ref.rollout.name=vllm
  actor_rollout_ref.rollout.temperature=0.7
  actor_rollout_ref.rollout.tensor_model_parallel_size="$TP_SIZE"
  actor_rollout_ref.rollout.gpu_memory_utilization=0.7
  actor_rollout_ref.rollout.n=16
  actor_rollout_ref.rollout.max_num_batched_tokens=32768
  actor_rollout_ref.ref.fsdp_config.param_offload=True
  reward.reward_manager.name=naive
  reward.custom_reward_function.path="$HERE/reward.py"
  reward.custom_reward_function.name="compute_score_$REWARD_VARIANT"
  trainer.critic_warmup=0
  trainer.logger="$LOGGER"
  trainer.project_name="$PROJECT"
  trainer.experiment_name="$EXPERIMENT"
  trainer.default_local_dir="$OUT_DIR"
  trainer.val_before_train=False
  trainer.n_gpus_per_node="$N_GPUS"
  trainer.nnodes="$NNODES"
  trainer.save_freq=120
  trainer.test_freq=-1
  trainer.total_epochs=1
)
# verl 0.9 reads the reward from reward.* (the top-level custom_reward_function and reward_model.reward_manager
# keys are legacy, and main_ppo ignores them); the rollout mode is verl's own unless asked for.
if [[ -n "$ROLLOUT_MODE" ]]; then command+=(actor_rollout_ref.rollout.mode="$ROLLOUT_MODE"); fi
command+=("$@")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${command[@]}"
  printf '\n'
else
  exec "${command[@]}"
fi
