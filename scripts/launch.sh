#!/usr/bin/env bash
# Run flashdreams on the GPUs of this node with torchrun (one process per GPU).
#   scripts/launch.sh recipe=self_forcing_wan21_t2v_1_3b_taehv parallel=ulysses
#   NPROC=2 scripts/launch.sh recipe=self_forcing_wan21_t2v_1_3b_taehv parallel=ring
#   ENTRY=flashdreams-bench NPROC=4 scripts/launch.sh recipe=... parallel=usp parallel.ulysses_degree=2
# NPROC defaults to the GPUs nvidia-smi lists (1 without any); ENTRY to flashdreams-run.
# Every argument is a Hydra override given to each rank; rank 0 writes the outputs.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "${NPROC:-0}" -ge 1 ]] || NPROC=1
fi
exec torchrun --standalone --nproc_per_node="$NPROC" --no-python "${ENTRY:-flashdreams-run}" "$@"
