# stickyproxy: the proxy, with its C extensions (httptools/llhttp, uvloop, aiohttp's parser).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stickyproxy ./stickyproxy
# Wheels exist for every C dependency on this base: no compiler needed. Fail the build if
# the C parser or loop are missing rather than run on a pure-Python fallback.
RUN pip install . \
 && python -c "import httptools.parser.parser, uvloop, aiohttp._http_parser" \
 && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin stickyproxy
COPY config/example.toml /etc/stickyproxy/stickyproxy.toml

USER stickyproxy
WORKDIR /
# 8080: proxy listener; 9090: admin API and /metrics. Both listen where the config says:
# set [listen] host = "0.0.0.0" to accept traffic from outside the container.
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["stickyproxy"]
CMD ["run", "-c", "/etc/stickyproxy/stickyproxy.toml"]
