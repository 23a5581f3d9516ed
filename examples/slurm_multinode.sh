#!/bin/bash
# Multi-node `cybertron train` under Slurm: one torchrun per node, torchrun's c10d rendezvous on the
# first node. torchrun sets RANK / LOCAL_RANK / WORLD_SIZE for every rank; cybertron reads them once.
#
#   sbatch examples/slurm_multinode.sh                       # 2 nodes x 8 GPUs: FSDP 4 x TP 4
#   NODES=4 sbatch --nodes 4 examples/slurm_multinode.sh      # the same script on 4 nodes
#
# Surviving faults: a rank that dies (a GPU error, an OOM) makes torchrun restart every rank of the job, up to
# MAX_RESTARTS times; restarted ranks resume from the newest complete checkpoint by themselves. A node that is
# lost or a job that is preempted ends the job step: --requeue puts the job back in the queue under the same
# job id (so the same RUN_DIR), and the requeued job resumes from the newest checkpoint as below.
#
#SBATCH --job-name=cybertron
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node; it starts the per-GPU ranks
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append           # a requeued job appends to the same log instead of truncating it
#SBATCH --requeue                    # node failure or preemption: requeue the job (same id, same RUN_DIR)

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}
RUN_DIR=${RUN_DIR:-runs/slurm-$SLURM_JOB_ID}  # set RUN_DIR to a fixed path to resume across jobs
MAX_RESTARTS=${MAX_RESTARTS:-3}
# Restarted ranks need a TCP store of their own, not the one the dead ranks used (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

export OMP_NUM_THREADS=8
# NCCL on InfiniBand / RoCE clusters usually needs nothing else; uncomment to debug hangs:
# export NCCL_DEBUG=INFO TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# Resume is automatic after a requeue (the job keeps its id, so RUN_DIR is the same): --resume continues from the newest complete
# DCP checkpoint (any layout can resume it). It is passed only once a checkpoint exists, because --resume
# with nothing to resume is refused (a mistyped RUN_DIR must not silently start a new run); complete
# checkpoints are checkpoints/step-N, half-written ones .tmp-step-N. (Ranks restarted by torchrun inside
# one job step resume by themselves: cybertron reads TORCHELASTIC_RESTART_COUNT.)
RESUME=""
if compgen -G "$RUN_DIR/checkpoints/step-*/trainer_state.json" > /dev/null; then
    RESUME="--resume"
fi

# Layout: tensor parallel inside a node (fast NVLink), FSDP (ZeRO-3) across nodes; dp_shard=-1 takes
# the rest of the world, so the same line works for any number of nodes.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --max-restarts "$MAX_RESTARTS" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" \
    -m cybertron train \
    --model.preset llama3-1b \
    --data.path "${DATA:-/path/to/corpus.jsonl}" --data.tokenizer "${TOKENIZER:-/path/to/tokenizer.json}" \
    --data.seq_len 4096 --train.global_batch_size 256 --train.micro_batch_size 2 \
    --parallel.tp "$GPUS_PER_NODE" --parallel.dp_shard -1 \
    --parallel.activation_checkpoint selective \
    --out "$RUN_DIR" ${RESUME:+"$RESUME"}
