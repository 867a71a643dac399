#!/usr/bin/env bash
# CI stage "package": the product as users get it (docs/design.md P7).
#
#  1. builds the sdist, and the wheel from that sdist, with isolated builds (python -m build);
#  2. installs the wheel into a fresh venv outside the checkout;
#  3. from a directory outside the checkout: `stickyproxy check` on every shipped config,
#     `route` and `plan` (with no secret in the environment), `route` into a closed pipe, a
#     `stickyproxy run` that proxies one request and drains on SIGTERM, and a short
#     `stickyproxy demo --no-ui` that must end with 0 failed and 0 lost;
#  4. the test suite against the installed package: a copy of the checkout without the
#     package's source, run with the venv's python, so `import stickyproxy` is the wheel.
#
# Exits non-zero on any failure; prints how long it took either way.
# PACKAGE_PYTEST_MARK selects tests by marker (CI: "not slow"); PACKAGE_PYTEST_ARGS adds
# arguments to step 4.
set -euo pipefail
started=$SECONDS
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Long enough for three shops to start and serve ~40 requests; the demo's own bounds do the rest.
DEMO_SECONDS=8

WORK=$(mktemp -d /tmp/stickyproxy-package.XXXXXX)
cleanup() {
    local rc=$?
    [ -n "${RUN_PID:-}" ] && kill "$RUN_PID" 2>/dev/null || true
    [ -n "${BACKEND_PID:-}" ] && kill "$BACKEND_PID" 2>/dev/null || true
    rm -rf "$WORK"
    echo "package stage: $((SECONDS - started)) s, $([ $rc -eq 0 ] && echo passed || echo "FAILED (exit $rc)")"
}
trap cleanup EXIT
step() { echo; echo "== package: $* ($((SECONDS - started)) s)"; }
fail() { echo "package: FAILED: $*" >&2; exit 1; }

if ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server
fi

step "build the sdist, then the wheel from it (isolated builds)"
"$PY" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q 'build>=1.2'
"$WORK/tools/bin/python" -m build --outdir "$WORK/dist" "$REPO" > "$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; fail "python -m build"; }
ls -l "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/stickyproxy-*.whl)
SDIST=$(ls "$WORK"/dist/stickyproxy-*.tar.gz)
"$WORK/tools/bin/python" - "$WHEEL" "$SDIST" "$REPO" <<'EOF'
import runpy, sys, tarfile, zipfile
wheel, sdist, repo = sys.argv[1:]
names = set(zipfile.ZipFile(wheel).namelist())
modules = runpy.run_path(f"{repo}/stickyproxy/compiled.py")["COMPILED_MODULES"]
need = {"stickyproxy/_build_stamp.json", "stickyproxy/demo/shop/__main__.py",
        "stickyproxy/demo/watchdog.py"}
missing = sorted(need - names)
for m in modules:
    prefix = m.replace(".", "/") + "."
    if not any(n.startswith(prefix) and n.endswith(".so") for n in names):
        missing.append(prefix + "*.so")
in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
missing += sorted({"build_backend.py", "setup.py", "pyproject.toml"} - in_sdist)
if missing:
    sys.exit(f"missing from the built distributions: {', '.join(missing)}")
print(f"wheel: {len(modules)} compiled modules, the build stamp and the demo; sdist: the build files")
EOF

step "install the wheel into a fresh venv outside the checkout"
VENV="$WORK/venv"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "$WHEEL[test,bench]"
SP="$VENV/bin/stickyproxy"
OUT="$WORK/elsewhere"
mkdir -p "$OUT"
cd "$OUT"
where=$("$VENV/bin/python" -c 'import stickyproxy; print(stickyproxy.__file__)')
echo "stickyproxy.__file__ = $where"
case "$where" in "$VENV"/*) ;; *) fail "stickyproxy imported from $where, not the venv" ;; esac
"$VENV/bin/python" -c 'from stickyproxy import compiled
from stickyproxy.control import startup
assert compiled.build() == "compiled", compiled.build()
problems = startup.check_runtime()
assert not problems, problems
print("build: compiled; start-up checks: clean")'
"$SP" --version

step "check every shipped config, with no secret in the environment"
for cfg in "$REPO"/config/*.toml "$REPO"/examples/compose/stickyproxy.toml; do
    env -u STICKYPROXY_ADMIN_TOKEN "$SP" check -c "$cfg"
done
env -u STICKYPROXY_ADMIN_TOKEN "$SP" route -c "$REPO/config/production.toml" alice bob
env -u STICKYPROXY_ADMIN_TOKEN "$SP" plan --from "$REPO/config/example.toml" --to "$REPO/config/production.toml"
# ~600 KB of routes into a reader that leaves after one line: exit 141, nothing on stderr
set +o pipefail
# shellcheck disable=SC2046
"$SP" route -c "$REPO/config/example.toml" $(seq -f 'user-%g' 1 20000) 2>"$WORK/route.err" | head -1
route_rc=${PIPESTATUS[0]}
set -o pipefail
[ -s "$WORK/route.err" ] && { cat "$WORK/route.err"; fail "route into a closed pipe wrote to stderr"; }
[ "$route_rc" -eq 141 ] || fail "route into a closed pipe exited $route_rc, not 141"

step "stickyproxy run: one request through it, then SIGTERM"
free_port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
BACKEND_PORT=$(free_port); PROXY_PORT=$(free_port); ADMIN_PORT=$(free_port)
mkdir -p "$WORK/www" && echo "served by the backend" > "$WORK/www/hello.txt"
"$VENV/bin/python" -m http.server "$BACKEND_PORT" --bind 127.0.0.1 --directory "$WORK/www" \
    > "$WORK/backend.log" 2>&1 &
BACKEND_PID=$!
cat > "$WORK/run.toml" <<EOF
[listen]
host = "127.0.0.1"
port = $PROXY_PORT
[admin]
host = "127.0.0.1"
port = $ADMIN_PORT
[health]
path = "/hello.txt"
interval = "500ms"
timeout = "400ms"
[[backends]]
id = "only"
url = "http://127.0.0.1:$BACKEND_PORT"
EOF
"$SP" run -c "$WORK/run.toml" > "$WORK/run.log" 2>&1 &
RUN_PID=$!
"$VENV/bin/python" - "$PROXY_PORT" "$ADMIN_PORT" <<'EOF' || { cat "$WORK/run.log"; fail "stickyproxy run"; }
import sys, time, urllib.request
proxy, admin = sys.argv[1:]
end = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > end:
        sys.exit("the proxy did not become ready within 30 s")
    time.sleep(0.1)
req = urllib.request.Request(f"http://127.0.0.1:{proxy}/hello.txt", headers={"X-User-Id": "alice"})
with urllib.request.urlopen(req, timeout=5) as r:
    body = r.read().decode()
    assert r.status == 200 and body.strip() == "served by the backend", (r.status, body)
    print("proxied:", r.status, body.strip())
with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
    assert b"stickyproxy_requests_total" in r.read()
EOF
kill -TERM "$RUN_PID"
run_rc=0; wait "$RUN_PID" || run_rc=$?
RUN_PID=
[ "$run_rc" -eq 0 ] || { cat "$WORK/run.log"; fail "stickyproxy run exited $run_rc after SIGTERM"; }
grep -qi traceback "$WORK/run.log" && { cat "$WORK/run.log"; fail "traceback in the run log"; }
echo "run: served, scraped, drained and exited 0"

step "stickyproxy demo --no-ui --duration $DEMO_SECONDS, from outside the checkout"
demo_rc=0
"$SP" demo --no-ui --duration "$DEMO_SECONDS" --port "$(free_port)" < /dev/null > "$WORK/demo.log" 2>&1 \
    || demo_rc=$?
tail -4 "$WORK/demo.log"
[ "$demo_rc" -eq 0 ] || { cat "$WORK/demo.log"; fail "the demo exited $demo_rc"; }
summary=$(tail -1 "$WORK/demo.log")
[[ $summary =~ ^demo\ summary:\ answers=([0-9]+)\ failed=([0-9]+)\ rate_limited=([0-9]+)\ lost=([0-9]+)$ ]] \
    || fail "the demo's last line is not its summary: $summary"
[ "${BASH_REMATCH[1]}" -gt 0 ] || fail "the demo got no answers"
[ "${BASH_REMATCH[2]}" -eq 0 ] && [ "${BASH_REMATCH[4]}" -eq 0 ] || fail "the demo: $summary"
grep -q '^stopped: everything the demo started has exited$' "$WORK/demo.log" || fail "the demo left processes"
demo_dir=$(sed -n 's/^  logs    //p' "$WORK/demo.log")
[ -n "$demo_dir" ] && [ ! -e "$demo_dir" ] || fail "the demo's directory ${demo_dir:-?} is still there"

step "the test suite against the installed package"
TREE="$WORK/tree"
mkdir -p "$TREE"
# The checkout's files without the package's source: tests, bench, config, docs, examples.
# An empty stickyproxy/ stays for the tests that check what the Dockerfiles copy; a directory
# without __init__.py never shadows the installed package.
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$REPO" && grep -zv '^stickyproxy/' | xargs -0 cp --parents -t "$TREE" 2>/dev/null || true)
mkdir -p "$TREE/stickyproxy"
cd "$TREE"
where=$("$VENV/bin/python" -c 'import stickyproxy; print(stickyproxy.__file__)')
echo "from $TREE: stickyproxy.__file__ = $where"
case "$where" in "$VENV"/*) ;; *) fail "the tests would import stickyproxy from $where" ;; esac
tests_started=$SECONDS
# shellcheck disable=SC2086
# PACKAGE_PYTEST_MARK: a marker expression (CI runs the fast tests here; stage 1 ran all)
STICKYPROXY_EXPECT_BUILD=compiled "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    -m "${PACKAGE_PYTEST_MARK:-}" ${PACKAGE_PYTEST_ARGS:-}
echo "tests against the wheel: $((SECONDS - tests_started)) s"
