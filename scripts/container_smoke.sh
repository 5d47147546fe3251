#!/usr/bin/env bash
# Build the server image with podman and check that a container of it serves a real request.
#
#   1. If the base image named by the Dockerfile's BASE_IMAGE default (debian:bookworm-slim) is
#      not in local storage, make it: a Debian bookworm minbase tree from debootstrap, using the
#      Debian mirror this machine's apt uses, imported with `podman import`. Nothing is pulled.
#   2. Build the image with runc. torch comes from a local CPU wheel when one is found, because
#      PyPI's default torch wheel is a multi-GB CUDA build. Without one, it comes from the
#      Dockerfile's default CPU index.
#   3. Run the container published on 127.0.0.1 only, wait for /readyz, then check the user,
#      the health check, and one POST /generate, which must return 200 with text.
#   4. Stop the container (expecting a clean exit) and remove it.
#
# Run as root (debootstrap and rootful podman). Settings, all optional:
#   IMAGE            image tag to build                       (peo-server:smoke)
#   PORT             host port on 127.0.0.1                   (a free one)
#   PODMAN_FLAGS     global podman flags (--storage-driver vfs --cgroup-manager cgroupfs
#                    --events-backend file)
#   ULIMIT_NOFILE    open files limit for builds and runs     (the current soft limit)
#   ULIMIT_NPROC     process limit for builds and runs        (4096)
#   DEBIAN_MIRROR    Debian mirror for debootstrap            (the one apt uses, else deb.debian.org)
#   TORCH_VERSION    torch version for the build              (2.13.0+cpu when a local wheel is found)
#   TORCH_WHEEL_DIRS folders searched for that wheel          (/opt/wheels /opt/pypi/files /opt/pypi-more/files)
#   HOST_CA_BUNDLE   CA bundle pip trusts inside the build, for TLS-inspecting proxies
#                    (/etc/ssl/certs/ca-certificates.crt if present; empty: pip's own)
#   BUNDLE_DIR       a bundle folder to mount and serve instead of the image's checkpoints
#   READY_TIMEOUT    seconds to wait for /readyz              (300)
#   REMOVE_IMAGE     1 removes the built image at the end     (0)

set -euo pipefail

cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-peo-server:smoke}
read -r -a PODMAN_GLOBAL <<< "${PODMAN_FLAGS:---storage-driver vfs --cgroup-manager cgroupfs --events-backend file}"
ULIMIT_NOFILE=${ULIMIT_NOFILE:-$(ulimit -Sn)}
ULIMIT_NPROC=${ULIMIT_NPROC:-4096}
READY_TIMEOUT=${READY_TIMEOUT:-300}
TORCH_WHEEL_DIRS=${TORCH_WHEEL_DIRS:-/opt/wheels /opt/pypi/files /opt/pypi-more/files}
LIMITS=(--ulimit "nofile=${ULIMIT_NOFILE}:${ULIMIT_NOFILE}" --ulimit "nproc=${ULIMIT_NPROC}:${ULIMIT_NPROC}")
CONTAINER=peo-smoke-$$

pm() { podman "${PODMAN_GLOBAL[@]}" "$@"; }
say() { printf '[container-smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { say "FAIL: $*"; exit 1; }

for tool in podman runc python3; do
    command -v "$tool" > /dev/null || fail "$tool is not installed (apt-get install podman runc)"
done

started=$SECONDS

# ---- 1. base image -------------------------------------------------------------------------

base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n 1)
[ -n "$base" ] || fail "no 'ARG BASE_IMAGE=' default in the Dockerfile"
case "$base" in
    */*) base_ref=$base ;;
    *) base_ref=docker.io/library/$base ;;
esac

if pm image exists "$base_ref"; then
    say "base image $base_ref is already in local storage"
else
    case "$base" in
        debian:bookworm-slim | debian:bookworm) ;;
        *) fail "can only make debian:bookworm(-slim) locally, not $base; load $base_ref first" ;;
    esac
    command -v debootstrap > /dev/null || fail "debootstrap is not installed (apt-get install debootstrap)"
    # Print the URI that apt uses for a Debian suite, or nothing.
    apt_uri() {
        apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2> /dev/null \
            | awk -v suite="$1" '$2 == suite { print $1; exit }'
    }
    mirror=${DEBIAN_MIRROR:-$(apt_uri bookworm)}
    mirror=${mirror:-http://deb.debian.org/debian/}
    security=$(apt_uri bookworm-security)
    security=${security:-http://deb.debian.org/debian-security/}

    say "making $base_ref: debootstrap bookworm minbase from $mirror"
    rootfs=$(mktemp -d /var/tmp/peo-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    if ! nice -n 15 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1; then
        tail -n 20 "$rootfs.log"
        fail "debootstrap failed (full log: $rootfs.log)"
    fi
    rm -f "$rootfs.log"
    # The same apt sources layout as Debian's own images: release, updates and security.
    rm -f "$rootfs/etc/apt/sources.list"
    cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: ${mirror}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${security}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # mktemp created the folder with mode 0700, and it becomes the image's root directory.
    chmod 755 "$rootfs"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$rootfs" -c . \
        | pm import \
            --change 'ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD=["bash"]' \
            --change 'LABEL org.opencontainers.image.description="local debootstrap build of Debian bookworm minbase"' \
            --message "debootstrap --variant=minbase bookworm $mirror" \
            - "$base_ref" > /dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "made $base_ref in $((SECONDS - started))s"
fi

# ---- 2. project image ----------------------------------------------------------------------

build_args=()
volumes=()
wheel_dir=
version=${TORCH_VERSION:-2.13.0+cpu}
for dir in $TORCH_WHEEL_DIRS; do
    if compgen -G "$dir/torch-${version}-*.whl" > /dev/null; then
        wheel_dir=$dir
        break
    fi
done
if [ -n "$wheel_dir" ]; then
    say "torch ${version} from the local wheel folder $wheel_dir"
    volumes=(-v "$wheel_dir:/wheels:ro")
    build_args=(--build-arg "TORCH_VERSION=${version}" --build-arg "TORCH_INDEX_URL=" --build-arg PIP_FIND_LINKS=/wheels)
elif [ -n "${TORCH_VERSION:-}" ]; then
    fail "no torch-${version} wheel in: $TORCH_WHEEL_DIRS"
else
    say "no local torch wheel found; using the Dockerfile's default CPU index"
fi

ca_bundle=${HOST_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
if [ -n "$ca_bundle" ] && [ -f "$ca_bundle" ]; then
    say "pip in the build trusts the host CA bundle $ca_bundle"
    volumes+=(-v "$ca_bundle:/run/host-ca-bundle.pem:ro")
    build_args+=(--build-arg PIP_CERT=/run/host-ca-bundle.pem)
fi

build_started=$SECONDS
say "building $IMAGE"
nice -n 15 podman "${PODMAN_GLOBAL[@]}" build \
    --runtime runc --pull=never --format docker "${LIMITS[@]}" \
    "${volumes[@]}" "${build_args[@]}" \
    -t "$IMAGE" -f Dockerfile . \
    || fail "podman build failed"
build_seconds=$((SECONDS - build_started))
size=$(pm image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE in ${build_seconds}s ($((size / 1000 / 1000)) MB)"

# ---- 3. run and request --------------------------------------------------------------------

PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

cleanup() {
    pm rm -f -t 5 "$CONTAINER" > /dev/null 2>&1 || true
}
trap cleanup EXIT

# Without systemd, podman cannot schedule the periodic health check, so the script runs it
# once below.
run_flags=()
[ -d /run/systemd/system ] || run_flags+=(--health-interval disable)
if [ -n "${BUNDLE_DIR:-}" ]; then
    say "serving the bundle $BUNDLE_DIR instead of the image's own"
    run_flags+=(-v "$(realpath "$BUNDLE_DIR"):/bundle:ro" -e PEO_BUNDLE=/bundle)
fi

run_started=$SECONDS
pm run -d --name "$CONTAINER" --runtime runc "${LIMITS[@]}" "${run_flags[@]}" \
    -p "127.0.0.1:${PORT}:8000" "$IMAGE" > /dev/null \
    || fail "podman run failed"
say "started $CONTAINER on 127.0.0.1:${PORT}"

export SMOKE_URL="http://127.0.0.1:${PORT}"
deadline=$((SECONDS + READY_TIMEOUT))
until python3 -c 'import os, urllib.request; urllib.request.urlopen(os.environ["SMOKE_URL"] + "/readyz", timeout=2)' 2> /dev/null; do
    if [ "$(pm inspect --format '{{.State.Running}}' "$CONTAINER")" != true ]; then
        pm logs "$CONTAINER" | tail -n 40
        fail "the container exited before it was ready"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        pm logs "$CONTAINER" | tail -n 40
        fail "/readyz did not return 200 within ${READY_TIMEOUT}s (timed out)"
    fi
    sleep 2
done
say "ready after $((SECONDS - run_started))s"

uid=$(pm exec "$CONTAINER" id -u)
[ "$uid" != 0 ] || fail "the server runs as root"
say "server runs as uid $uid"

pm healthcheck run "$CONTAINER" > /dev/null || fail "the image's HEALTHCHECK failed"
say "health check passed"

python3 - <<'EOF' || fail "POST /generate did not return 200 with non-empty text"
import json
import os
import time
import urllib.request

body = {
    "prompt": "Give one short tip for staying focused while studying.",
    "preference": 0.5,
    "max_new_tokens": 32,
    "temperature": 0.0,
}
request = urllib.request.Request(
    os.environ["SMOKE_URL"] + "/generate",
    data=json.dumps(body).encode(),
    headers={"Content-Type": "application/json"},
    method="POST",
)
began = time.monotonic()
with urllib.request.urlopen(request, timeout=120) as response:
    status = response.status
    reply = json.load(response)
elapsed = time.monotonic() - began
text = reply.get("text", "")
print(f"[container-smoke] POST /generate -> {status} in {elapsed:.2f}s, "
      f"{reply['usage']['completion_tokens']} tokens, finish={reply['finish_reason']}, "
      f"coefficients={reply['coefficients']}")
print(f"[container-smoke] text: {text!r}")
if status != 200 or not text.strip():
    raise SystemExit(1)
EOF

# ---- 4. stop and remove --------------------------------------------------------------------

stop_started=$SECONDS
pm stop -t 40 "$CONTAINER" > /dev/null
code=$(pm inspect --format '{{.State.ExitCode}}' "$CONTAINER")
say "stopped after $((SECONDS - stop_started))s"
pm rm "$CONTAINER" > /dev/null
trap - EXIT
[ "$code" = 0 ] || fail "the server exited with status $code on SIGTERM"
say "exit status 0, removed $CONTAINER"

if [ "${REMOVE_IMAGE:-0}" = 1 ]; then
    pm rmi "$IMAGE" > /dev/null
    say "removed $IMAGE"
fi
say "PASS in $((SECONDS - started))s (image build ${build_seconds}s)"
