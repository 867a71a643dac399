# The example shop (stickyproxy.demo.shop, the app `stickyproxy demo` runs) as an image of its
# own, for the compose stack. Built from the repository root:
#   docker build -f examples/Dockerfile.app .
#
# The package is installed pure Python (STICKYPROXY_COMPILE=0): the shop runs the context
# library, which is not in the compiled set (stickyproxy/compiled.py), so compiling would
# need a C compiler, mypy and a build stage on the full image, and change nothing the app
# runs. Behind a package index other than PyPI: --build-arg PIP_INDEX_URL=... (and
# PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST); they reach the install stage only.
FROM python:3.11-slim AS install
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 STICKYPROXY_COMPILE=0
COPY . /src/
# A venv: the same commands work on the python images and on a distribution's python3.
RUN python3 -m venv /opt/venv && cd /src && /opt/venv/bin/python -m pip install -q .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
COPY --from=install /opt/venv /opt/venv
# Fail the build, not the first start, if the app cannot import.
RUN python -c "import stickyproxy.demo.shop.app" \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin shop

USER shop
EXPOSE 9000
# docker stop sends SIGTERM (the default STOPSIGNAL); the shop shuts down cleanly on it.
ENTRYPOINT ["python", "-m", "stickyproxy.demo.shop"]
CMD ["--host", "0.0.0.0", "--port", "9000", "--node-id", "app", "--redis", "redis://redis:6379/0"]
