#!/usr/bin/env bash
#SBATCH --job-name=autofit-workers
#SBATCH --partition=gpu
#SBATCH --gres=gpu:1
#SBATCH --array=0-7
#SBATCH --time=02:00:00
set -euo pipefail
: "${AUTOFIT_STORAGE:?export AUTOFIT_STORAGE=postgresql+psycopg://USER:PW@HOST:5432/DB}"
autofit worker exp.yaml --storage "$AUTOFIT_STORAGE" --device cuda:0 \
    --id "${SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID}@$(hostname)"
