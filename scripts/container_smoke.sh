#!/usr/bin/env bash
# The container path end to end on this machine (issue #8): `bentoml build` + `bentoml containerize`, `podman run`,
# then the running image is checked (ready, embedded model, classification, Redis from inside) and its answers
# are compared with `bentoml serve service:QueryRouter` on the host.
#
# What differs from the user's `docker` path, and why (README § Deployment):
# - podman (runc, cgroupfs, no default ulimits, host network): there is no Docker daemon here;
# - a local Debian bookworm + Python 3.11 base made with debootstrap: no registry, so python:3.11-slim can't be pulled;
# - torch from the local CPU wheel: download.pytorch.org is unreachable (scripts/container_bentofile.py);
# - the host's CA bundle mounted into the build: HTTPS to PyPI goes through a proxy that only it trusts.
#
# Usage: scripts/container_smoke.sh           build (cached after the first run), run, check, compare
#        scripts/container_smoke.sh --clean   remove the cached base image and smoke image, then stop
# Needs root (apt-get, podman) and a Redis on 127.0.0.1:6379 (SMOKE_REDIS_URL to pick another URL or db).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${VENV_BIN:-$REPO/.venv/bin}
BASE_IMAGE=localhost/query-router-base:bookworm-py311
IMAGE=localhost/query-router:smoke
TORCH_REQUIREMENT=torch==2.13.0  # bentofile.yaml's pin
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
REDIS_URL_SMOKE=${SMOKE_REDIS_URL:-redis://127.0.0.1:6379/13}
REDIS_PREFIX="container-smoke-$$:"  # this run's keys only, deleted at exit
CACHE_L1_SIZE_SMOKE=0  # no L1: repeated texts must come back from Redis, which proves L2 works from inside
CONTAINER=query-router-smoke-$$
SMOKE_LABEL=query-router.container-smoke=true  # on the base image, so on every image and build layer made from it
WORK=""

log() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }
seconds_since() { awk -v start="$1" -v end="$(now)" 'BEGIN { printf "%.1f", end - start }'; }

cleanup() {
    if podman container exists "$CONTAINER" 2>/dev/null; then
        podman rm -f -t 5 "$CONTAINER" >/dev/null || true
    fi
    if command -v redis-cli >/dev/null; then
        redis-cli -u "$REDIS_URL_SMOKE" --scan --pattern "$REDIS_PREFIX*" | xargs -r redis-cli -u "$REDIS_URL_SMOKE" del >/dev/null || true
    fi
    [ -n "$WORK" ] && rm -rf "$WORK"
}

install_tools_if_missing() {
    if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
        log "installing podman, runc, debootstrap (Debian packages)"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap
    fi
    command -v redis-cli >/dev/null || { echo "redis-cli not found (apt-get install redis-tools)" >&2; exit 1; }
    redis-cli -u "$REDIS_URL_SMOKE" ping >/dev/null || { echo "no Redis at $REDIS_URL_SMOKE" >&2; exit 1; }
}

# podman's defaults don't work here: runc (not crun), cgroupfs (no systemd), and no default ulimits (the container
# may not raise them). CONTAINERS_CONF reaches every podman call, including the one `bentoml containerize` makes.
# The build's copy also mounts the host's CA bundle into every RUN step (pip and uv reach PyPI through a proxy only
# that bundle trusts); it is not passed as `--opt volume` because BentoML's podman backend joins two such options
# into one broken --volume, and the wheel folder needs the one.
write_containers_confs() {
    cat >"$WORK/containers-build.conf" <<EOF
[containers]
default_ulimits = []
volumes = ["$CA_BUNDLE:$CA_BUNDLE:ro"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
    grep -v '^volumes' "$WORK/containers-build.conf" >"$WORK/containers.conf"
    export CONTAINERS_CONF="$WORK/containers.conf"
}

# The Debian mirror this machine's apt uses (debian.sources or sources.list); DEBIAN_MIRROR overrides it.
debian_mirror() {
    local mirror=""
    mirror=$(grep -hsEo '(URIs:|^deb) +https?://[^ ]+/debian/?( |$)' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list | awk 'NR == 1 { print $2 }') || true
    echo "${DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}"
}

# A stand-in for python:3.11-slim: Debian bookworm with its Python 3.11, made locally because no registry answers.
build_base_image_if_missing() {
    if podman image exists "$BASE_IMAGE"; then
        echo "base image $BASE_IMAGE: cached"
        return
    fi
    local mirror start root="$WORK/rootfs"
    mirror=$(debian_mirror)
    log "building $BASE_IMAGE with debootstrap from $mirror"
    start=$(now)
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" "$mirror" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    # Like python:3.11-slim: pip may install into the system Python (the Dockerfile pip-installs uv there).
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -cf "$WORK/base.tar" .
    # PATH: imported images have none and the Dockerfile appends to it. SSL_CERT_FILE: uv otherwise trusts only
    # its built-in roots, not the mounted bundle (the file is Debian's own bundle in the final image).
    podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "ENV SSL_CERT_FILE=$CA_BUNDLE" \
        --change 'CMD ["python3"]' \
        --change "LABEL $SMOKE_LABEL" \
        "$WORK/base.tar" "$BASE_IMAGE" >/dev/null
    rm -rf "$root" "$WORK/base.tar"
    echo "base image built in $(seconds_since "$start") s"
}

# The CPU torch wheel from local disk (pip's find-links here); a CUDA wheel is refused by container_bentofile.py.
fetch_torch_wheel() {
    mkdir -p "$WORK/wheels"
    "$BIN/python" -m pip download -q "$TORCH_REQUIREMENT" --no-deps --only-binary=:all: -d "$WORK/wheels"
    TORCH_WHEEL=$(ls "$WORK"/wheels/torch-*.whl)
    echo "torch wheel: $(basename "$TORCH_WHEEL")"
}

# bentofile.yaml with the local base image and torch wheel, used only here; the committed file stays the users'.
build_bento() {
    "$BIN/python" "$REPO/scripts/container_bentofile.py" --base-image "$BASE_IMAGE" \
        --torch-wheel "$TORCH_WHEEL" --find-links file:///wheels >"$WORK/bentofile.smoke.yaml"
    # A private BentoML home: the smoke build never touches ~/bentoml.
    export BENTOML_HOME="$WORK/bentoml" BENTOML_DO_NOT_TRACK=true
    BENTO_TAG=$(cd "$REPO" && PATH="$BIN:$PATH" "$BIN/bentoml" build -f "$WORK/bentofile.smoke.yaml" --output tag . |
        sed -n 's/^__tag__://p')
    echo "bento: $BENTO_TAG"
}

# The CA bundle and the wheel folder are mounted into the build's RUN steps only; the image contains neither.
containerize_bento() {
    log "bentoml containerize $BENTO_TAG --backend podman -t $IMAGE"
    CONTAINERS_CONF="$WORK/containers-build.conf" PATH="$BIN:$PATH" \
        "$BIN/bentoml" containerize "$BENTO_TAG" --backend podman -t "$IMAGE" \
        --opt network=host --opt "volume=$WORK/wheels:/wheels:ro" >"$WORK/containerize.log" 2>&1 ||
        { tail -40 "$WORK/containerize.log"; exit 1; }
    echo "$(grep -c -- '--> Using cache' "$WORK/containerize.log" || true) build steps from podman's cache"
}

free_port() {
    "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The entrypoint runs `bentoml serve "$@" $BENTO_PATH`: arguments after the image are serve options.
run_container() {
    PORT=$(free_port)
    URL="http://127.0.0.1:$PORT"
    log "podman run $IMAGE on $URL (REDIS_URL=$REDIS_URL_SMOKE, CACHE_L1_SIZE=$CACHE_L1_SIZE_SMOKE)"
    RUN_START=$(now)
    podman run -d --name "$CONTAINER" --network=host \
        -e CACHE_L1_SIZE="$CACHE_L1_SIZE_SMOKE" -e REDIS_URL="$REDIS_URL_SMOKE" -e REDIS_KEY_PREFIX="$REDIS_PREFIX" \
        "$IMAGE" --host 127.0.0.1 --port "$PORT" >/dev/null
}

wait_until_ready() {
    local deadline=$((SECONDS + 300))
    until curl -fsS -o /dev/null "$URL/health/ready" 2>/dev/null; do
        if [ "$(podman container inspect -f '{{.State.Running}}' "$CONTAINER")" != true ] || [ $SECONDS -gt $deadline ]; then
            echo "container not ready; its log:" >&2
            podman logs "$CONTAINER" 2>&1 | tail -40 >&2
            exit 1
        fi
        sleep 0.2
    done
    READY_SECONDS=$(seconds_since "$RUN_START")
    echo "ready $READY_SECONDS s after podman run"
}

# torch in the image must be the CPU build (a CUDA one would mean the override did not apply).
check_torch_is_cpu_build() {
    local version
    version=$(podman exec "$CONTAINER" python -c 'import torch; print(torch.__version__)')
    echo "torch in the image: $version"
    [[ $version == *+cpu ]] || { echo "expected a +cpu torch" >&2; exit 1; }
}

stop_container() {
    podman stop -t 20 "$CONTAINER" >/dev/null
    podman rm "$CONTAINER" >/dev/null
}

image_size() {
    podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.2f GB", $1 / 1e9 }'
}

# The base image, the smoke image and podman's build cache layers: all carry the base image's label.
remove_cached_images() {
    local images
    images=$(podman images -a -q --filter "label=$SMOKE_LABEL")
    if [ -n "$images" ]; then
        podman rmi -f $images >/dev/null
    fi
    echo "removed $(echo "$images" | grep -c . || true) images labelled $SMOKE_LABEL"
}

main() {
    if [ "${1:-}" = "--clean" ]; then
        remove_cached_images
        return
    fi
    [ $# -eq 0 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2; }
    WORK=$(mktemp -d /tmp/container-smoke.XXXXXX)
    trap cleanup EXIT
    install_tools_if_missing
    write_containers_confs
    build_base_image_if_missing

    log "bentoml build + containerize (private BENTOML_HOME)"
    local start
    start=$(now)
    fetch_torch_wheel
    build_bento
    containerize_bento
    BUILD_SECONDS=$(seconds_since "$start")
    echo "built $IMAGE in $BUILD_SECONDS s, $(image_size)"

    run_container
    wait_until_ready
    check_torch_is_cpu_build
    log "checking the container"
    (cd "$REPO" && "$BIN/python" scripts/compare_container.py check "$URL" \
        --cache-l1-size "$CACHE_L1_SIZE_SMOKE" --out "$WORK/container.json")
    stop_container

    log "comparing with bentoml serve service:QueryRouter on the host"
    (cd "$REPO" && "$BIN/python" scripts/compare_container.py compare "$WORK/container.json")

    log "summary"
    echo "image:          $IMAGE, $(image_size)"
    echo "build:          $BUILD_SECONDS s (bentoml build + containerize, base image excluded)"
    echo "ready:          $READY_SECONDS s from podman run to /health/ready 200"
    "$BIN/python" -c 'import json, sys; l = json.load(open(sys.argv[1]))["latency_ms"]
print("latency:        %.1f ms p50 of 20 requests answered by the model, %.1f ms p50 answered from Redis" % (l["miss"], l["hit"]))' \
        "$WORK/container.json"
    echo "container smoke test passed"
}

main "$@"
