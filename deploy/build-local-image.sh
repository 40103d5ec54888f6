#!/usr/bin/env bash
# Builds the CPU image without a Docker engine (buildah, chroot isolation),
# runs it with podman and calls the dataset service's health check.
#
#   sudo deploy/build-local-image.sh
#
# Needs root and the Debian packages buildah, podman, runc and debootstrap. No
# registry image is pulled: the Dockerfile's base (python:3.11-slim-bookworm) is
# stood in for by a minimal Debian bookworm made here with debootstrap. A
# directory of wheels (PIP_FIND_LINKS, e.g. one holding a CPU-only torch) is
# offered to pip during the build when set.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/tunewire:0.1.0}
BASE=python:3.11-slim-bookworm
WORK=${WORK:-/var/tmp/tunewire-image}
CA=${CA:-/etc/ssl/certs/ca-certificates.crt}
PORT=${PORT:-50351}

if ! buildah images --format '{{.Name}}:{{.Tag}}' | grep -q "$BASE"; then
  echo "== making the base image from debootstrap"
  rm -rf "$WORK/rootfs" && mkdir -p "$WORK"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,passwd bookworm "$WORK/rootfs"
  # pip installs into the image's own Python, as in the official python image.
  rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
  container=$(buildah from scratch)
  buildah copy "$container" "$WORK/rootfs" /
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$container"
  buildah commit --rm "$container" "docker.io/library/$BASE"
fi

echo "== building $IMAGE"
wheels=()
if [ -n "${PIP_FIND_LINKS:-}" ]; then
  wheels=(--volume "$PIP_FIND_LINKS:/wheels:ro" --env PIP_FIND_LINKS=/wheels)
fi
buildah bud --isolation=chroot --pull=never --layers \
  --volume "$CA:/etc/ssl/certs/host-ca.crt:ro" --env PIP_CERT=/etc/ssl/certs/host-ca.crt \
  "${wheels[@]}" \
  -f deploy/docker/Dockerfile.cpu -t "$IMAGE" .

echo "== running it"
podman=(podman --runtime runc --cgroup-manager cgroupfs)
run=("${podman[@]}" run --rm --network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
"${run[@]}" -e TUNEWIRE_HOST=127.0.0.1 -e TUNEWIRE_DATASET_PORT="$PORT" "$IMAGE" python -m tunewire.services.dataset &
service=$!
trap 'kill -TERM "$service" 2>/dev/null || true; wait "$service" 2>/dev/null || true' EXIT

echo "== health check (from a second container of the same image)"
for _ in $(seq 60); do
  if "${run[@]}" "$IMAGE" python -c "
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel('127.0.0.1:$PORT'))
status = stub.Check(health_pb2.HealthCheckRequest(service='tunewire.v1.DatasetService'), timeout=2).status
print('health:', health_pb2.HealthCheckResponse.ServingStatus.Name(status))
raise SystemExit(status != health_pb2.HealthCheckResponse.SERVING)
" 2>/dev/null; then
    echo "== $IMAGE serves"
    exit 0
  fi
  sleep 2
done
exit 1
