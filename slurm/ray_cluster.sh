# shellcheck shell=bash
# A Ray cluster inside this Slurm job, sourced by every stage script (never copied):
#   ray_cluster_up     head on the first node, one worker on every other node, each as
#                      `ray start ... --block` under its own srun step, so nothing outlives the job;
#                      waits until every node has joined (error naming the missing ones otherwise)
#   ray_cluster_down   stops exactly these srun steps (never `ray stop`, which would end every Ray
#                      instance of the user on the node)
#   run_stage NAME ARGS... / run_pipeline ARGS...
#                      runs `python -m cluster.stage NAME ARGS...` (or `python -m cluster.pipeline`) as
#                      the driver; USR1 (sbatch --signal=B:USR1@...) is passed to the driver, whose
#                      running stages checkpoint (each writes its RUN_DIR/STOP); a USR1 before the driver
#                      started keeps it from starting; a driver that exits 75 (preempted after its
#                      checkpoint) requeues the job, which resumes from `latest` with no flag; any other
#                      failure is not requeued.
# A node whose Slurm address is loopback (NodeAddr=127.0.0.1, a workstation install) is registered
# by Ray under the machine's own address; the head's is taken from Ray.
# Ports and the Ray temp dir derive from the job id, so two jobs sharing a node do not collide.
# Knobs (environment): UNIREPLKNET_HOME (the project checkout; default: the submit directory),
# UNIREPLKNET_PYTHON, UNIREPLKNET_RUN_ROOT, RAY_CPUS_PER_NODE, RAY_GPUS_PER_NODE,
# RAY_NODE_TIMEOUT (seconds to wait for the nodes, default 300), and those of `python -m cluster.stage`.

UNIREPLKNET_HOME=${UNIREPLKNET_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ -z "${UNIREPLKNET_PYTHON:-}" ]]; then
    if [[ -x "$UNIREPLKNET_HOME/.venv/bin/python" ]]; then UNIREPLKNET_PYTHON=$UNIREPLKNET_HOME/.venv/bin/python
    else UNIREPLKNET_PYTHON=python3; fi
fi
RAY_BIN=$(dirname "$UNIREPLKNET_PYTHON")/ray
[[ -x "$RAY_BIN" ]] || RAY_BIN=ray
export PYTHONPATH="$UNIREPLKNET_HOME${PYTHONPATH:+:$PYTHONPATH}"
export UNIREPLKNET_RUN_ROOT=${UNIREPLKNET_RUN_ROOT:-$UNIREPLKNET_HOME/runs}
# GPUs per node: RAY_GPUS_PER_NODE, else the job's --gpus-per-node ("a100:8" -> 8), else 8
: "${RAY_GPUS_PER_NODE:=${SLURM_GPUS_PER_NODE:-8}}"
RAY_GPUS_PER_NODE=${RAY_GPUS_PER_NODE##*:}
export RAY_GPUS_PER_NODE

RAY_JOB_BASE_PORT=$(( 20000 + (SLURM_JOB_ID % 40) * 1000 ))   # this job's block of 1000 ports
RAY_HEAD_PORT=$RAY_JOB_BASE_PORT
RAY_TEMP_DIR=/tmp/ray-j$SLURM_JOB_ID                            # short: Ray's socket paths are limited
RAY_STEP_PIDS=()

_node_ip() {  # the address Slurm reaches the node at, as an IPv4 address
    local addr
    addr=$(scontrol show node "$1" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    if [[ "$addr" =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then echo "$addr"
    else getent ahostsv4 "$addr" | awk 'NR == 1 {print $1}'; fi
}

_ray_node_args() {  # ports of node $1 (index in the job), distinct per node in case several share a machine
    local base=$(( RAY_JOB_BASE_PORT + 10 + ($1 % 8) * 120 ))
    echo "--node-manager-port=$base --object-manager-port=$((base + 1)) --metrics-export-port=$((base + 2))" \
         "--dashboard-agent-grpc-port=$((base + 3)) --dashboard-agent-listen-port=$((base + 4))" \
         "--runtime-env-agent-port=$((base + 5)) --min-worker-port=$((base + 20)) --max-worker-port=$((base + 119))" \
         "--temp-dir=$RAY_TEMP_DIR --disable-usage-stats --block"
}

ray_cluster_up() {
    local nodes ips resources i
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    RAY_LOG_DIR=$UNIREPLKNET_RUN_ROOT/slurm-logs/$SLURM_JOB_ID
    mkdir -p "$RAY_LOG_DIR"
    resources=()
    [[ -n "${RAY_CPUS_PER_NODE:-${SLURM_CPUS_PER_TASK:-}}" ]] && resources+=(--num-cpus="${RAY_CPUS_PER_NODE:-$SLURM_CPUS_PER_TASK}")
    [[ -n "${RAY_GPUS_PER_NODE:-}" ]] && resources+=(--num-gpus="$RAY_GPUS_PER_NODE")
    ips=()
    for i in "${!nodes[@]}"; do ips+=("$(_node_ip "${nodes[$i]}")"); done
    RAY_HEAD_IP=${ips[0]}
    echo "ray: head ${nodes[0]} ($RAY_HEAD_IP:$RAY_HEAD_PORT), ${#nodes[@]} nodes, logs in $RAY_LOG_DIR"
    # shellcheck disable=SC2046
    srun --nodes=1 --ntasks=1 --overlap -w "${nodes[0]}" --output="$RAY_LOG_DIR/${nodes[0]}.log" \
        "$RAY_BIN" start --head --node-ip-address="$RAY_HEAD_IP" --port="$RAY_HEAD_PORT" \
        --ray-client-server-port=$((RAY_JOB_BASE_PORT + 1)) --include-dashboard=false \
        "${resources[@]}" $(_ray_node_args 0) &
    RAY_STEP_PIDS+=($!)
    # the address Ray registered the head under: its own for a loopback NodeAddr (127.0.0.1 on a workstation)
    local registered
    registered=$("$UNIREPLKNET_PYTHON" -m cluster.ray_nodes --address "$RAY_HEAD_IP:$RAY_HEAD_PORT" --head \
        --names "${nodes[0]}" --timeout "${RAY_NODE_TIMEOUT:-300}" | tail -n 1) && [[ -n "$registered" ]] || return 1
    if [[ "$registered" != "$RAY_HEAD_IP" ]]; then
        echo "ray: Ray registered the head ${nodes[0]} as $registered (Slurm's address: $RAY_HEAD_IP); using $registered"
        RAY_HEAD_IP=$registered
        ips[0]=$registered
    fi
    export RAY_ADDRESS=$RAY_HEAD_IP:$RAY_HEAD_PORT
    for i in "${!nodes[@]}"; do
        (( i == 0 )) && continue
        # shellcheck disable=SC2046
        srun --nodes=1 --ntasks=1 --overlap -w "${nodes[$i]}" --output="$RAY_LOG_DIR/${nodes[$i]}.log" \
            "$RAY_BIN" start --address="$RAY_ADDRESS" --node-ip-address="${ips[$i]}" \
            "${resources[@]}" $(_ray_node_args "$i") &
        RAY_STEP_PIDS+=($!)
    done
    "$UNIREPLKNET_PYTHON" -m cluster.ray_nodes --address "$RAY_ADDRESS" --ips "$(IFS=,; echo "${ips[*]}")" \
        --names "$(IFS=,; echo "${nodes[*]}")" --timeout "${RAY_NODE_TIMEOUT:-300}"
}

ray_cluster_down() {
    local pid waited
    (( ${#RAY_STEP_PIDS[@]} )) || return 0
    for pid in "${RAY_STEP_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for waited in $(seq 60); do
        local alive=0
        for pid in "${RAY_STEP_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 1
    done
    for pid in "${RAY_STEP_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    RAY_STEP_PIDS=()
    echo "ray: this job's nodes stopped"
}

_request_stop() {  # USR1: passed to the driver, whose running stages checkpoint and stop (each its RUN_DIR/STOP)
    STOP_REQUESTED=1
    if [[ -n "${DRIVER_PID:-}" ]] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        echo "USR1: asking $DRIVER_NAME (pid $DRIVER_PID) to checkpoint and stop"
        kill -USR1 "$DRIVER_PID"
    else
        echo "USR1 before $DRIVER_NAME started: it will not start"
    fi
}

_drive() {  # start the Ray cluster, run the driver command "$@", stop the cluster; requeue on 75
    local status=0
    STOP_REQUESTED=0
    DRIVER_PID=
    trap ray_cluster_down EXIT
    trap _request_stop USR1
    ray_cluster_up || { echo "ray: the cluster did not come up" >&2; return 1; }
    cd "$UNIREPLKNET_HOME" || return 1
    if (( STOP_REQUESTED )); then
        status=75
    else
        "$@" &
        DRIVER_PID=$!
        while true; do  # a trapped signal interrupts `wait`; keep waiting for the driver itself
            wait "$DRIVER_PID" && status=0 || status=$?
            kill -0 "$DRIVER_PID" 2>/dev/null || break
        done
    fi
    ray_cluster_down
    if (( status == 75 )); then
        echo "$DRIVER_NAME preempted after its checkpoint: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    echo "$DRIVER_NAME finished with status $status"
    return "$status"
}

run_stage() {  # run_stage NAME ARGS...: `python -m cluster.stage NAME --run-dir RUN_ROOT/NAME ARGS...`
    local name=$1
    shift
    # one Ray Train worker per GPU of the job unless told otherwise (none on CPU-only nodes: the stage decides)
    : "${UNIREPLKNET_NUM_WORKERS:=$(( SLURM_JOB_NUM_NODES * RAY_GPUS_PER_NODE ))}"
    (( UNIREPLKNET_NUM_WORKERS > 0 )) || unset UNIREPLKNET_NUM_WORKERS
    export UNIREPLKNET_NUM_WORKERS
    STAGE_RUN_DIR=${STAGE_RUN_DIR:-$UNIREPLKNET_RUN_ROOT/$name}
    mkdir -p "$STAGE_RUN_DIR"
    DRIVER_NAME="stage $name"
    _drive "$UNIREPLKNET_PYTHON" -m cluster.stage "$name" --run-dir "$STAGE_RUN_DIR" "$@"
}

run_pipeline() {  # run_pipeline ARGS...: `python -m cluster.pipeline --run-root RUN_ROOT ARGS...`
    DRIVER_NAME="pipeline"
    _drive "$UNIREPLKNET_PYTHON" -m cluster.pipeline --run-root "$UNIREPLKNET_RUN_ROOT" "$@"
}
