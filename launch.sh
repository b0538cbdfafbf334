#!/usr/bin/env bash
# Launch `mst-ds train` through the DeepSpeed launcher: one CPU machine, one GPU node, or a cluster.
#
#   ./launch.sh --preset NAME [--hostfile FILE] [--nodes N] [--gpus-per-node G] [--set k=v ...]
#               [--run-dir DIR] [--cpu N] [--no_ssh --node_rank R --master_addr A [--master_port P]]
#
#   --cpu N           N local CPU processes (DS_ACCELERATOR=cpu, gloo backend)
#   --hostfile FILE   DeepSpeed hostfile ("host slots=G" per line); the launcher starts every node over
#                     pdsh/ssh, or, with --no_ssh, run this same command on every node with its --node_rank
#   --nodes/--gpus-per-node   how much of the hostfile to use (default: all of it)
#   Inside a SLURM allocation (sbatch/salloc) without --hostfile, the allocation's nodes are the hostfile.
# SIGTERM/SIGUSR1 to the job (its process group, or every process as SLURM signals a job step): the ranks
# finish their step, save it and exit; this script then exits 75 (requeue). Everything after `--` goes to
# the DeepSpeed launcher unchanged. The launcher appends --local_rank=N to
# the training command; `mst-ds train` accepts it. ROCm (Sugon DCU) vs CUDA is detected from torch and
# the matching RCCL/NCCL environment is set (override any variable by exporting it first).
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "launch.sh: error: $*" >&2; exit 2; }

preset="" hostfile="" nodes="" gpus="" cpu="" run_dir="" master_port="${MASTER_PORT:-}"
sets=() launcher=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset="${2:?--preset needs a value}"; shift 2 ;;
    --hostfile) hostfile="${2:?}"; shift 2 ;;
    --nodes) nodes="${2:?}"; shift 2 ;;
    --gpus-per-node) gpus="${2:?}"; shift 2 ;;
    --cpu) cpu="${2:?}"; shift 2 ;;
    --set) sets+=(--set "${2:?--set needs section.key=value}"); shift 2 ;;
    --run-dir) run_dir="${2:?}"; shift 2 ;;
    --no_ssh|--no-ssh) launcher+=(--no_ssh); shift ;;
    --node_rank|--node-rank) launcher+=(--node_rank "${2:?}"); shift 2 ;;
    --master_addr|--master-addr) launcher+=(--master_addr "${2:?}"); shift 2 ;;
    --master_port|--master-port) master_port="${2:?}"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; launcher+=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$preset" ]] || die "--preset is required"
# A stop signal is recorded here (bash runs the trap once the foreground command has ended) and the
# launcher chain outlives it: DeepSpeed's runner (no handler) ignores SIGTERM and SIGUSR1 and waits for
# launch.py, launch.py ignores SIGUSR1 (SIGTERM it forwards to the ranks and waits 30 s for them), and
# the ranks set their own handlers (mst_ds/job.py StopSignals).
stop_signal=""
trap 'stop_signal=TERM' TERM
trap 'stop_signal=USR1' USR1
[[ -z "$hostfile" || -f "$hostfile" ]] || die "--hostfile $hostfile: no such file"
[[ -z "$cpu" || "$cpu" =~ ^[1-9][0-9]*$ ]] || die "--cpu $cpu: expected a positive process count"
# mktemp needs it after the pre-flight: say so now, not after minutes of checks.
[[ -z "${TMPDIR:-}" || ( -d "$TMPDIR" && -w "$TMPDIR" ) ]] || die "TMPDIR=$TMPDIR: no such writable directory"

# Stay in the caller's directory: relative --hostfile, --run-dir and --set paths mean what they say.
here="$(cd "$(dirname "$0")" && pwd)"
[[ -f "$here/.venv/bin/activate" && -z "${VIRTUAL_ENV:-}" ]] && . "$here/.venv/bin/activate"

# Accelerator and collective-library environment.
if [[ -n "$cpu" ]]; then
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / cpu > 0 ? $(nproc) / cpu : 1 ))}"
  gpus="$cpu"
elif [[ "${DS_ACCELERATOR:-}" == cpu ]]; then
  :  # CPU processes per node from the hostfile's slots or --gpus-per-node (e.g. multi-node CPU tests)
elif ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  die "no GPU visible to torch: use --cpu N for CPU processes"
elif python -c 'import sys, torch; sys.exit(0 if torch.version.hip else 1)' 2>/dev/null; then
  # ROCm (DCU): RCCL sits behind the "nccl" backend and reads the NCCL_* variables.
  export DS_ACCELERATOR=cuda
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export HSA_FORCE_FINE_GRAIN_PCIE="${HSA_FORCE_FINE_GRAIN_PCIE:-1}"  # RCCL peer-to-peer over PCIe
  export MIOPEN_USER_DB_PATH="${MIOPEN_USER_DB_PATH:-/tmp/miopen-${USER:-user}}"  # no locks on a shared home
  export MIOPEN_CUSTOM_CACHE_DIR="${MIOPEN_CUSTOM_CACHE_DIR:-$MIOPEN_USER_DB_PATH}"
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
else
  export DS_ACCELERATOR=cuda
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
fi

# Inside a SLURM allocation without --hostfile: the allocation is the hostfile (nodes from
# SLURM_JOB_NODELIST via scontrol or mst_ds.cluster's expander, slots from SLURM_GPUS_ON_NODE or
# --gpus-per-node), master = its first node. One launch on the batch host starts every node over pdsh
# and takes a free port there; with --no_ssh (one launch per node, e.g. `srun --ntasks-per-node=1
# ./launch.sh --no_ssh ...`) every node derives the same port from SLURM_JOB_ID and its node rank from
# SLURM_NODEID.
slurm_hostfile=""
if [[ -z "$hostfile" && -z "$cpu" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  slurm_hostfile="$(mktemp "${TMPDIR:-/tmp}/mst_ds_hostfile.XXXXXX")"
  master_host="$(python -m mst_ds.cluster hostfile "$slurm_hostfile" ${gpus:+"$gpus"})" || { rm -f "$slurm_hostfile"; exit 2; }
  hostfile="$slurm_hostfile"
  [[ " ${launcher[*]} " == *" --master_addr "* ]] || launcher+=(--master_addr "$master_host")
  if [[ " ${launcher[*]} " == *" --no_ssh "* ]]; then
    if [[ " ${launcher[*]} " != *" --node_rank "* ]]; then
      [[ -n "${SLURM_NODEID:-}" ]] || die "--no_ssh under SLURM needs --node_rank (no SLURM_NODEID)"
      launcher+=(--node_rank "$SLURM_NODEID")
    fi
    if [[ -z "$master_port" ]]; then
      master_port="$(python -c 'import sys; from mst_ds.cluster import port_for_job; print(port_for_job(sys.argv[1]))' \
        "${SLURM_JOB_ID:?--no_ssh under SLURM needs SLURM_JOB_ID or --master_port}")"
    fi
  elif [[ -z "$master_port" ]]; then
    master_port="$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
  fi
  echo "launch.sh: SLURM allocation $SLURM_JOB_NODELIST → $(wc -l < "$hostfile") node(s), master $master_host:$master_port" >&2
fi

if [[ -z "$master_port" ]]; then
  # Local CPU runs take a free port (several may share a machine); clusters use DeepSpeed's 29500.
  if [[ -n "$cpu" ]]; then
    master_port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  else
    master_port=29500
  fi
fi

# Validate once before any rank starts (config, data, run-directory lock, resume compatibility) and build
# DeepSpeed's CPU comm op once: a bad setting is one line here, not one per rank plus launcher noise.
# Other nodes of a --no_ssh job skip the lock probe (node 0's ranks may already hold the lock); under SLURM
# the node rank is known only after the allocation block above, so the check comes after it.
node_rank=0
for ((i = 0; i < ${#launcher[@]}; i++)); do [[ "${launcher[i]}" == --node_rank ]] && node_rank="${launcher[i+1]}"; done
check=(python -m mst_ds.cli train --check --preset "$preset" "${sets[@]}")
[[ -n "$run_dir" ]] && check+=(--run-dir "$run_dir")
MST_DS_NODE_RANK="$node_rank" "${check[@]}" || { rc=$?; rm -f ${slurm_hostfile:+"$slurm_hostfile"}; exit "$rc"; }
if [[ -n "$stop_signal" ]]; then
  rm -f ${slurm_hostfile:+"$slurm_hostfile"}
  echo "launch.sh: SIG$stop_signal before the ranks started; exiting 75 (requeue)" >&2
  exit 75
fi
export MST_DS_LAUNCHER_PID=$$  # ranks watch this shell and die with it (mst_ds/job.py)

# The launcher forwards only NCCL/PYTHON/UCX/... variables to other nodes (pdsh); the rest of the
# environment set here travels in a DeepSpeed env file (the user's ~/.deepspeed_env is kept).
envfile="$(mktemp "${TMPDIR:-/tmp}/mst_ds_env.XXXXXX")"
[[ -f "$HOME/.deepspeed_env" ]] && cat "$HOME/.deepspeed_env" >> "$envfile"
for v in DS_ACCELERATOR OMP_NUM_THREADS HSA_FORCE_FINE_GRAIN_PCIE MIOPEN_USER_DB_PATH MIOPEN_CUSTOM_CACHE_DIR \
         TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_EXTENSIONS_DIR; do
  if [[ -n "${!v:-}" ]]; then echo "$v=${!v}" >> "$envfile"; fi
done
export DS_ENV_FILE="$envfile"

cmd=(deepspeed --master_port "$master_port")
[[ -n "$hostfile" ]] && cmd+=(--hostfile "$hostfile")
[[ -n "$nodes" ]] && cmd+=(--num_nodes "$nodes")
[[ -n "$gpus" ]] && cmd+=(--num_gpus "$gpus")
cmd+=("${launcher[@]}" --module mst_ds.cli train --preset "$preset" "${sets[@]}")
[[ -n "$run_dir" ]] && cmd+=(--run-dir "$run_dir")
echo "launch.sh: DS_ACCELERATOR=$DS_ACCELERATOR ${cmd[*]}" >&2
set +e
(trap '' TERM USR1; exec "${cmd[@]}")
rc=$?
rm -f "$envfile" ${slurm_hostfile:+"$slurm_hostfile"}
if [[ -n "$stop_signal" && $rc -ne 0 ]]; then
  # launch.py exits 1 after forwarding a SIGTERM, whatever its ranks said: they saved their last step
  # (or, if that save failed, `latest` still names the previous complete checkpoint).
  echo "launch.sh: stopped by SIG$stop_signal; the newest complete checkpoint is the resume point (exit 75)" >&2
  exit 75
fi
exit "$rc"
