#!/usr/bin/env bash
# CI, container stage: build both images on a real Docker engine started here, run the proxy
# image with the container configuration (config/container.toml), proxy requests through it
# to a backend, scrape /metrics, and stop it with SIGTERM while a request is in flight: that
# request must complete, and the proxy must exit 0 on its own.
#
# No container registry is used. The base images the Dockerfiles name (python:3.11 and
# python:3.11-slim) are built here with debootstrap from the Debian mirror apt uses, and
# tagged with those names; pip inside `docker build` reaches the package index through the
# host's network, with the host's pip settings (read at run time, see pip_settings).
#
# The engine is private to this run (its own data root, exec root, socket and pid file; vfs
# storage; no bridge or iptables) and is stopped, and its data deleted, on every exit. Its
# data goes to a tmpfs when MEMORY_NEEDED_GB of memory is available, else to disk (TMPDIR);
# without the memory or DISK_NEEDED_GB of free disk the stage is skipped with a loud message
# (exit 0). An engine that does not start fails the stage.
#
# Environment: STICKYPROXY_CI_STORAGE=auto|tmpfs|disk (default auto); STICKYPROXY_CI_CACHE
# (default /var/cache/stickyproxy-ci) keeps debootstrap's packages and the base root file
# systems between runs (a root file system is rebuilt when older than BASE_MAX_AGE_DAYS).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive DOCKER_BUILDKIT=0 PIP_DISABLE_PIP_VERSION_CHECK=1

# Measured: a run's engine data and base root file systems peak at about 5 GB (the stage
# prints its own peak); the margin covers growth of the images.
DISK_NEEDED_GB=10
# The same held in a tmpfs, plus room for everything else on the machine.
MEMORY_NEEDED_GB=12
TMPFS_SIZE_GB=$DISK_NEEDED_GB
# auto: a tmpfs when MEMORY_NEEDED_GB of memory is available, else disk.
STORAGE=${STICKYPROXY_CI_STORAGE:-auto}
# Debian's python3 in this release is the 3.11 the FROM lines name.
SUITE=bookworm
# Packages of the stand-in base images: python with venv and pip (ensurepip) for the slim
# image, plus a C compiler and Python's headers for the build image.
SLIM_PACKAGES=python3,python3-venv
FULL_PACKAGES=$SLIM_PACKAGES,python3-dev,gcc,libc6-dev
# A cached base root filesystem older than this is rebuilt (security updates).
BASE_MAX_AGE_DAYS=7
# Longest wait for the engine to answer, the proxy to be ready, a health check.
ENGINE_DEADLINE=60
READY_DEADLINE=60
HEALTH_DEADLINE=60
# The backend holds the request in flight during `docker stop` this long (well inside the
# container configuration's 8 s shutdown grace).
SLOW_SECONDS=2
CACHE=${STICKYPROXY_CI_CACHE:-/var/cache/stickyproxy-ci}
IMAGE=stickyproxy:ci
APP_IMAGE=stickyproxy-example-shop:ci
CONTAINER=stickyproxy-ci-$$

START=$SECONDS
step_start=$SECONDS
step() { step_start=$SECONDS; echo "== container: $*"; }
done_step() { echo "   done in $((SECONDS - step_start)) s"; record_use; }
fail() { echo "container stage FAILED: $*" >&2; exit 1; }
skip() {
    echo "##################################################################################"
    echo "## container stage SKIPPED: $*."
    echo "## The Docker images were NOT built or tested in this run."
    echo "##################################################################################"
    exit 0
}
gb() { echo $(( $1 / 1024 / 1024 )); }
mem_avail_kib() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }

# Where the engine's data goes ($WORK): a tmpfs when memory allows (vfs copies a whole image
# for every build step and container, about 3.5 times faster in memory on this machine kind,
# and deleting it is an unmount), else a directory on disk (TMPDIR).
WORK_PARENT=${TMPDIR:-/tmp}
step "storage for the engine"
case $STORAGE in
    auto) if [ "$(gb "$(mem_avail_kib)")" -ge $MEMORY_NEEDED_GB ]; then STORAGE=tmpfs; else STORAGE=disk; fi ;;
    tmpfs|disk) ;;
    *) fail "STICKYPROXY_CI_STORAGE must be auto, tmpfs or disk, not $STORAGE" ;;
esac
if [ $STORAGE = tmpfs ] && [ "$(gb "$(mem_avail_kib)")" -lt $MEMORY_NEEDED_GB ]; then
    skip "$(gb "$(mem_avail_kib)") GB of memory available; the engine in a tmpfs needs $MEMORY_NEEDED_GB GB"
fi
disk_free_kib=$(df -Pk "$WORK_PARENT" | awk 'NR == 2 {print $4}')
if [ $STORAGE = disk ] && [ "$(gb "$disk_free_kib")" -lt $DISK_NEEDED_GB ]; then
    skip "$(gb "$disk_free_kib") GB free on $WORK_PARENT; the engine's data (vfs copies every layer) needs $DISK_NEEDED_GB GB"
fi

WORK=$(mktemp -d "$WORK_PARENT/stickyproxy-ci-container.XXXXXX")
WORK_MOUNTED=
SOCK=$WORK/docker.sock
DOCKERD_PID=
BACKEND_PID=
DOCKER_BIN=docker
docker() { "$DOCKER_BIN" -H "unix://$SOCK" "$@"; }
# Peak use: what disappeared of the free space where $WORK is.
avail_kib() { df -Pk "$WORK" | awk 'NR == 2 {print $4}'; }

cleanup() {
    local rc=$?
    set +e
    echo "== container: clean up"
    local t=$SECONDS
    if [ -n "$BACKEND_PID" ]; then kill "$BACKEND_PID" 2>/dev/null; wait "$BACKEND_PID" 2>/dev/null; fi
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        docker rm -f "$CONTAINER" >/dev/null 2>&1
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            echo "   dockerd did not stop on SIGTERM within 30 s: SIGKILL"
            kill -KILL "$DOCKERD_PID"
        fi
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    [ -n "${AVAIL_AT_START:-}" ] && record_use
    # Nothing may stay mounted under the work directory (dockerd bind-mounts its data root)
    # before it is deleted, and the delete never crosses into another file system.
    findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m"
    done
    if [ -n "$WORK_MOUNTED" ]; then umount "$WORK" 2>/dev/null || umount -l "$WORK"; fi
    rm -rf --one-file-system "$WORK"
    echo "   done in $((SECONDS - t)) s"
    if [ -n "${AVAIL_AT_START:-}" ]; then
        echo "== container: total $((SECONDS - START)) s; peak use $(( (AVAIL_AT_START - MIN_AVAIL) / 1024 )) MiB" \
             "of the engine's $STORAGE storage"
    fi
    if [ $rc -ne 0 ]; then
        echo "container stage FAILED (exit $rc)" >&2
    fi
    exit $rc
}
trap cleanup EXIT

if [ $STORAGE = tmpfs ]; then
    mount -t tmpfs -o "size=${TMPFS_SIZE_GB}g,mode=0700" stickyproxy-ci "$WORK"
    WORK_MOUNTED=1
fi
AVAIL_AT_START=$(avail_kib)
MIN_AVAIL=$AVAIL_AT_START
record_use() {
    local now; now=$(avail_kib)
    if [ "$now" -lt "$MIN_AVAIL" ]; then MIN_AVAIL=$now; fi
}
echo "   $STORAGE at $WORK: $(gb "$AVAIL_AT_START") GB free" \
     "(memory available $(gb "$(mem_avail_kib)") GB, disk free $(gb "$disk_free_kib") GB)"
done_step

step "install docker.io and debootstrap"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
# The client shipped with this engine (another docker on PATH may be a newer CLI).
DOCKER_BIN=/usr/bin/docker
[ -x "$DOCKER_BIN" ] || DOCKER_BIN=$(command -v docker)
done_step

step "start a private Docker engine"
# dockerd starts its own containerd, whose state goes under --exec-root.
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" -H "unix://$SOCK" \
    --pidfile "$WORK/dockerd.pid" --storage-driver=vfs \
    --iptables=false --ip6tables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
deadline=$((SECONDS + ENGINE_DEADLINE))
until docker version >/dev/null 2>&1; do
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
        tail -n 30 "$WORK/dockerd.log" >&2
        fail "the Docker engine did not start (dockerd log above)"
    fi
    sleep 0.5
done
docker version --format '   engine {{.Server.Version}}, client {{.Client.Version}}'
done_step

# The host's pip settings that matter inside a build: the index, its trusted hosts, the CA
# bundle it is reached with, the timeout. Local-only ones (file: indexes, find-links,
# constraints) are left out. Printed as pip.conf text; the CA bundle path, if any, on fd 3.
pip_settings() {
    python3 - 3>"$WORK/pip-cert-path" <<'EOF'
import os, subprocess
out = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True,
                     text=True, check=True).stdout
keep = {"index-url", "extra-index-url", "trusted-host", "cert", "timeout", "default-timeout"}
settings = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    name = key.rsplit(".", 1)[-1]
    if name in keep:
        settings[name] = value.strip().strip("'\"")
for name in ("index-url", "extra-index-url"):
    if name in settings:
        urls = [u for u in settings[name].split() if not u.startswith("file:")]
        if urls:
            settings[name] = " ".join(urls)
        else:
            del settings[name]
if "default-timeout" in settings:
    settings["timeout"] = settings.pop("default-timeout")
if "cert" in settings:
    if os.path.isfile(settings["cert"]):
        os.write(3, settings["cert"].encode())
    else:
        del settings["cert"]
print("[global]")
for name, value in sorted(settings.items()):
    print(f"{name} = {value}")
EOF
}

# make_base TAG PACKAGES: a Debian root file system with PACKAGES, made to behave enough
# like the python images for the Dockerfiles (python on PATH at /usr/local/bin, pip able to
# reach the index as the host's pip does), imported as TAG.
make_base() {
    local tag=$1 packages=$2
    local mirror key cached rootfs=$WORK/rootfs
    # The mirror apt uses for this suite's main component (sources.list or deb822 sources).
    mirror=$(apt-cache policy | awk -v s="$SUITE/main" '$3 == s && /Packages/ {print $2; exit}')
    [ -n "$mirror" ] || fail "apt has no source for $SUITE/main (apt-cache policy)"
    # Keyed by everything that makes the tree: suite, mirror, packages and this recipe.
    key=$( { printf '%s %s %s\n' "$SUITE" "$mirror" "$packages"; declare -f make_base; } \
          | sha256sum | cut -c1-16)
    cached=$CACHE/rootfs-$key.tar
    mkdir -p "$CACHE/debs" "$rootfs"
    if [ -n "$(find "$cached" -mtime -"$BASE_MAX_AGE_DAYS" 2>/dev/null)" ]; then
        echo "   $tag: root file system from $cached"
        tar -C "$rootfs" -xf "$cached"
    else
        echo "   $tag: debootstrap --variant=minbase $SUITE $mirror (+ $packages)"
        if ! debootstrap --variant=minbase --include="$packages" --cache-dir="$CACHE/debs" \
                "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1; then
            tail -n 30 "$WORK/debootstrap.log" >&2
            fail "debootstrap failed (log above)"
        fi
        # What an image does not need (the python images leave these out too): every vfs
        # layer copies the whole tree, so each MB here costs a dozen times over.
        rm -rf "${rootfs:?}"/var/cache/apt/archives/*.deb "${rootfs:?}"/var/cache/apt/*.bin \
               "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/usr/share/doc/* \
               "${rootfs:?}"/usr/share/man/* "${rootfs:?}"/usr/share/info/* \
               "${rootfs:?}"/usr/share/locale/*
        tar -C "$rootfs" --exclude='./dev/*' -cf "$cached.$$.tmp" . && mv "$cached.$$.tmp" "$cached"
        # The cache stays bounded: trees of other recipes and packages nothing has used lately.
        find "$CACHE" -maxdepth 1 -name 'rootfs-*.tar' -mtime +"$BASE_MAX_AGE_DAYS" -delete
        find "$CACHE/debs" -name '*.deb' -mtime +$((4 * BASE_MAX_AGE_DAYS)) -delete
    fi
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python3"
    pip_settings >"$rootfs/etc/pip.conf"
    local cert; cert=$(cat "$WORK/pip-cert-path")
    if [ -n "$cert" ]; then
        mkdir -p "$rootfs$(dirname "$cert")"
        cp "$cert" "$rootfs$cert"
    fi
    tar -C "$rootfs" --exclude='./dev/*' -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag" >/dev/null
    rm -rf --one-file-system "$rootfs"
}

step "base image python:3.11 (build stage: python3, gcc, python3-dev)"
make_base python:3.11 "$FULL_PACKAGES"
done_step
step "base image python:3.11-slim (python3 only)"
make_base python:3.11-slim "$SLIM_PACKAGES"
done_step
echo "   pip settings from the host given to the base images:" \
     "$(pip_settings | awk -F' = ' 'NF == 2 {printf "%s ", $1}')"

# build_image LOG TAG [ARGS]: docker build; its output, each line with the seconds since the
# start, goes to LOG (the tail of it on failure); the Dockerfile steps that took 5 s or more
# are listed.
build_image() {
    local log=$WORK/$1 tag=$2; shift 2
    if ! docker build --network host -t "$tag" "$@" . 2>&1 | python3 -u -c '
import sys, time
start, steps = time.monotonic(), []
for line in sys.stdin:
    now = time.monotonic() - start
    print(f"{now:6.1f} {line}", end="", flush=True)
    if line.startswith("Step "):
        steps.append((now, line.split(" : ", 1)[-1].strip()[:70]))
steps.append((time.monotonic() - start, ""))
for (t0, what), (t1, _) in zip(steps, steps[1:]):
    if t1 - t0 >= 5:
        print(f"   {t1 - t0:5.0f} s  {what}", file=sys.stderr)
' >"$log"; then
        tail -n 60 "$log" >&2
        fail "$tag does not build (docker build output above)"
    fi
    docker image inspect "$tag" --format "   $tag: {{.Size}} bytes" \
        | awk '{printf "   %s %.0f MB\n", $1, $2 / 1e6}'
}

step "docker build: the proxy image (Dockerfile)"
build_image build-proxy.log "$IMAGE"
done_step

step "docker build: the example app image (examples/Dockerfile.app)"
build_image build-app.log "$APP_IMAGE" -f examples/Dockerfile.app
done_step

step "run the proxy image with the container configuration"
# A backend on loopback: answers every path; /slow holds its answer SLOW_SECONDS after
# noting the request's arrival in a file (so the stop below lands while it is in flight).
cat >"$WORK/backend.py" <<'PY'
import http.server, sys, time
port_file, arrived_file, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/slow":
            open(arrived_file, "w").close()
            time.sleep(slow)
        # The proxy names the backend it chose in X-Sticky-Backend (config [headers] prefix).
        body = (f"backend saw {self.path} for {self.headers.get('X-User-Id')} "
                f"via {self.headers.get('X-Sticky-Backend')}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os; os.replace(port_file + ".tmp", port_file)
server.serve_forever()
PY
python3 "$WORK/backend.py" "$WORK/backend.port" "$WORK/slow.arrived" "$SLOW_SECONDS" &
BACKEND_PID=$!
deadline=$((SECONDS + 10))
until [ -s "$WORK/backend.port" ]; do
    [ $SECONDS -lt $deadline ] || fail "the test backend did not start"
    sleep 0.1
done
BACKEND_PORT=$(cat "$WORK/backend.port")
read -r LISTEN_PORT ADMIN_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("0.0.0.0", 0))
print(*(s.getsockname()[1] for s in socks))')

# The container configuration as shipped, with only its ports (the engine has no bridge:
# the container shares this machine's network, where 8080 and 9090 may be taken) and its
# backends (the one above) changed; checked to differ in nothing else.
python3 - config/container.toml "$WORK/stickyproxy.toml" "$LISTEN_PORT" "$ADMIN_PORT" "$BACKEND_PORT" <<'PY'
import sys, tomllib
src, dst, listen, admin, backend = sys.argv[1:]
out, section = [], None
for line in open(src).read().split("\n"):
    if line.startswith("[[backends]]"):
        break
    if line.startswith("["):
        section = line.split("]")[0].strip("[")
    if section in ("listen", "admin") and line.split("=")[0].strip() == "port":
        line = f"port = {listen if section == 'listen' else admin}"
    out.append(line)
out += ["[[backends]]", 'id = "ci-backend"', f'url = "http://127.0.0.1:{backend}"', ""]
open(dst, "w").write("\n".join(out))
shipped, ours = tomllib.load(open(src, "rb")), tomllib.load(open(dst, "rb"))
for cfg in (shipped, ours):
    del cfg["listen"]["port"], cfg["admin"]["port"], cfg["backends"]
assert shipped == ours, "the test configuration drifted from config/container.toml"
PY
chmod 644 "$WORK/stickyproxy.toml"
TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
# The host's first non-loopback address: requests to it prove the container listens on
# every interface, not only on loopback.
HOST_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
HOST_IP=${HOST_IP:-127.0.0.1}
echo "   backend 127.0.0.1:$BACKEND_PORT; proxy $HOST_IP:$LISTEN_PORT; admin $HOST_IP:$ADMIN_PORT"
docker run -d --name "$CONTAINER" --network host \
    -e STICKYPROXY_ADMIN_TOKEN="$TOKEN" \
    -v "$WORK/stickyproxy.toml:/etc/stickyproxy/stickyproxy.toml:ro" \
    --health-interval 1s --health-start-period 0s "$IMAGE" >/dev/null
show_log() { echo "--- proxy log" >&2; docker logs "$CONTAINER" 2>&1 | tail -n 40 >&2; }
deadline=$((SECONDS + READY_DEADLINE))
until curl -fsS --max-time 2 -o /dev/null "http://$HOST_IP:$ADMIN_PORT/readyz" 2>/dev/null; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER")" != true ] || [ $SECONDS -ge $deadline ]; then
        show_log; fail "the proxy did not become ready on $HOST_IP:$ADMIN_PORT/readyz"
    fi
    sleep 0.2
done
done_step

step "proxy a request through the container; scrape /metrics; health check"
reply=$(curl -fsS --max-time 10 -H 'X-User-Id: alice' "http://$HOST_IP:$LISTEN_PORT/hello") \
    || { show_log; fail "the proxied request failed"; }
[ "$reply" = "backend saw /hello for alice via ci-backend" ] \
    || { show_log; fail "unexpected reply: $reply"; }
echo "   GET /hello -> $reply"
curl -fsS --max-time 10 "http://$HOST_IP:$ADMIN_PORT/metrics" >"$WORK/metrics" \
    || { show_log; fail "GET /metrics failed"; }
python3 - "$WORK/metrics" <<'PY' || fail "/metrics does not count the proxied request"
import sys
lines = [l for l in open(sys.argv[1]) if l.startswith("stickyproxy_requests_total{")]
n = sum(float(l.rsplit(" ", 1)[1]) for l in lines if 'backend="ci-backend"' in l)
print(f"   /metrics: stickyproxy_requests_total for ci-backend = {n:g}")
sys.exit(0 if n >= 1 else 1)
PY
# The image's HEALTHCHECK (run every second here) must find the admin port of the mounted
# configuration.
deadline=$((SECONDS + HEALTH_DEADLINE))
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")" = healthy ]; do
    if [ $SECONDS -ge $deadline ]; then
        docker inspect -f '{{json .State.Health}}' "$CONTAINER" >&2
        fail "the image's HEALTHCHECK never passed"
    fi
    sleep 0.5
done
echo "   HEALTHCHECK: healthy"
# Mutating admin endpoints take the token from the environment, and refuse without it.
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST \
       "http://$HOST_IP:$ADMIN_PORT/backends/ci-backend/undrain")
[ "$code" = 401 ] || fail "undrain without the token answered $code"
curl -fsS --max-time 5 -o /dev/null -X POST -H "Authorization: Bearer $TOKEN" \
    "http://$HOST_IP:$ADMIN_PORT/backends/ci-backend/undrain" \
    || fail "undrain with the token from STICKYPROXY_ADMIN_TOKEN was refused"
echo "   admin token from the environment: refused without it ($code), accepted with it"
done_step

step "docker stop (SIGTERM) with a request in flight"
curl -sS --max-time 30 -o "$WORK/slow.body" -w '%{http_code}' -H 'X-User-Id: bob' \
    "http://$HOST_IP:$LISTEN_PORT/slow" >"$WORK/slow.code" 2>"$WORK/slow.err" &
SLOW_PID=$!
deadline=$((SECONDS + 10))
until [ -e "$WORK/slow.arrived" ]; do
    [ $SECONDS -lt $deadline ] || fail "the slow request never reached the backend"
    sleep 0.05
done
stop_start=$SECONDS
# -t 30: far beyond the configuration's 8 s grace; exit 0 (not 137) shows it stopped itself.
docker stop -t 30 "$CONTAINER" >/dev/null
echo "   stopped in $((SECONDS - stop_start)) s"
wait "$SLOW_PID" || true
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
[ "$exit_code" = 0 ] || { show_log; fail "the proxy exited $exit_code after SIGTERM"; }
[ "$(cat "$WORK/slow.code")" = 200 ] \
    && [ "$(cat "$WORK/slow.body")" = "backend saw /slow for bob via ci-backend" ] \
    || { show_log; fail "the in-flight request was not completed: $(cat "$WORK/slow.code" "$WORK/slow.err")"; }
docker logs "$CONTAINER" 2>&1 | grep -q 'stopping: finishing in-flight requests' \
    || { show_log; fail "the proxy's log does not record the drain"; }
echo "   in-flight request completed (200), exit 0, log: $(docker logs "$CONTAINER" 2>&1 | grep -o 'stopping: finishing in-flight requests[^"]*' | head -1)"
done_step
