# stickyproxy: the proxy, with its C extensions (httptools/llhttp, uvloop, aiohttp's parser)
# and its hot path compiled with mypyc (README, "Building" and "Docker").
#
#   docker build -t stickyproxy .
#   docker run -e STICKYPROXY_ADMIN_TOKEN=... -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -v "$PWD/stickyproxy.toml:/etc/stickyproxy/stickyproxy.toml:ro" stickyproxy
#
# Behind a package index other than PyPI: --build-arg PIP_INDEX_URL=... (and
# PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST); they reach the build stage only.

# The build stage has the compiler mypyc needs; the image that runs has none.
# The build is hermetic: pip's build isolation is off, and this stage installs what a PEP 517
# front end would ([build-system] requires, then what the backend's
# get_requires_for_build_wheel asks for) plus the runtime dependencies, whose types mypyc
# compiles against. Nothing else is installed, so the result does not depend on the host.
FROM python:3.11 AS build
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST
# A venv: the same commands work on the python images and on a distribution's python3
# (which refuses pip installs into the system interpreter, PEP 668).
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH \
    STICKYPROXY_COMPILE=1

# What the build needs, in a layer of its own that only a change to pyproject.toml or the
# build backend rebuilds: the runtime dependencies (as wheels for the image, and installed
# here), [build-system] requires, then what the backend asks for (mypy and the packages
# whose types the compiled modules are checked against).
COPY pyproject.toml build_backend.py /src/
RUN cd /src && python3 -m venv /opt/venv \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
print(*p['project']['dependencies'], sep='\n', file=open('/tmp/runtime.txt', 'w')); \
print(*p['build-system']['requires'], sep='\n', file=open('/tmp/build-system.txt', 'w'))" \
 && python -m pip wheel -q -w /wheels -r /tmp/runtime.txt \
 && python -m pip install -q --no-index --find-links /wheels -r /tmp/runtime.txt \
 && python -m pip install -q -r /tmp/build-system.txt \
 && python -c "import build_backend; print('# from the build backend', \
*build_backend.get_requires_for_build_wheel(), sep='\n')" > /tmp/backend.txt \
 && python -m pip install -q -r /tmp/backend.txt

# The wheel, with isolation off so it builds against exactly what is installed above; then
# the venv the image runs, from wheels only.
COPY . /src/
RUN cd /src && python -m pip wheel -q --no-build-isolation --no-deps -w /wheels . \
 && python3 -m venv /opt/stickyproxy \
 && /opt/stickyproxy/bin/python -m pip install -q --no-index --find-links /wheels stickyproxy

# The image that runs: the venv built above, without the compiler, mypy or the wheels.
# (Both stages share one python build, so the venv's interpreter link holds.)
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/stickyproxy/bin:$PATH
COPY --from=build /opt/stickyproxy /opt/stickyproxy
# Fail the build rather than ship a proxy on a pure-Python fallback or a broken compile: the
# C parsers and the loop import, every hot-path module is compiled, the start-up checks of
# `stickyproxy run` pass, and the compiled metrics render a scrape.
RUN python -c "import httptools.parser.parser, uvloop, aiohttp._http_parser" \
 && python -c "from stickyproxy.compiled import build; assert build() == 'compiled', build()" \
 && python -c "from stickyproxy.control.startup import check_runtime; p = check_runtime(); assert not p, p" \
 && python -c "from prometheus_client import generate_latest; \
from stickyproxy.control.metrics import Stats, registry_for; generate_latest(registry_for(Stats))" \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin stickyproxy
# The default configuration; mount yours over it (config/container.toml says how).
COPY config/container.toml /etc/stickyproxy/stickyproxy.toml

USER stickyproxy
# 8080: proxy listener; 9090: admin API, /healthz and /metrics (both on 0.0.0.0 in the
# default configuration; the admin token comes from STICKYPROXY_ADMIN_TOKEN).
EXPOSE 8080 9090
# Liveness from the admin listener, at the port the mounted configuration gives it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["python", "-c", \
  "import tomllib, urllib.request; a = tomllib.load(open('/etc/stickyproxy/stickyproxy.toml', 'rb')).get('admin', {}); urllib.request.urlopen('http://127.0.0.1:%d/healthz' % a.get('port', 9090), timeout=2)"]
# docker stop sends SIGTERM (the default STOPSIGNAL): in-flight requests finish for up to
# [timeouts] shutdown, then the proxy exits 0.
ENTRYPOINT ["stickyproxy"]
CMD ["run", "-c", "/etc/stickyproxy/stickyproxy.toml"]
