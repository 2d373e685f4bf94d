#!/usr/bin/env bash
# Run a command under NVIDIA MPS: start a control daemon of this user's own (its pipes and logs in a
# temp folder, so it meets no other user's server), run the command with that environment, stop it.
#   bash benchmarks/with_mps.sh CMD ARGS...
# Without nvidia-cuda-mps-control, or when the daemon does not start, it says so and exits 3 without
# running the command (a result "under MPS" must have had MPS). docs/gpu.md: what MPS changes.
set -u
command -v nvidia-cuda-mps-control >/dev/null 2>&1 || { echo "with_mps: nvidia-cuda-mps-control not found" >&2; exit 3; }
dir=$(mktemp -d /tmp/gpctl-mps.XXXXXX)
export CUDA_MPS_PIPE_DIRECTORY="$dir/pipe" CUDA_MPS_LOG_DIRECTORY="$dir/log"
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d || { echo "with_mps: the MPS control daemon did not start" >&2; rm -rf "$dir"; exit 3; }
for _ in $(seq 50); do [ -p "$CUDA_MPS_PIPE_DIRECTORY/control" ] && break; sleep 0.1; done
[ -p "$CUDA_MPS_PIPE_DIRECTORY/control" ] || { echo "with_mps: no control pipe in $CUDA_MPS_PIPE_DIRECTORY" >&2; exit 3; }
stop() {      # also when the stage's timeout signals us: never leave a daemon behind
  echo quit | nvidia-cuda-mps-control
  sleep 1
  tail -n 5 "$CUDA_MPS_LOG_DIRECTORY/control.log" >&2 2>/dev/null
  rm -rf "$dir"
}
trap 'stop; exit 143' TERM INT
"$@"
rc=$?
trap - TERM INT
stop
exit $rc
