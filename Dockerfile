# stickyproxy: the proxy, with its C extensions (httptools/llhttp, uvloop, aiohttp's parser)
# and its hot path compiled with mypyc (README, "Building").

# The build stage has the compiler mypyc needs; the image that runs has none.
FROM python:3.11 AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py build_backend.py README.md ./
COPY stickyproxy ./stickyproxy
RUN STICKYPROXY_COMPILE=1 pip wheel --no-deps -w /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# Wheels exist for every C dependency on this base. Fail the build if the C parsers, the
# loop or the compiled hot path are missing rather than run on a pure-Python fallback.
RUN pip install /wheels/*.whl \
 && python -c "import httptools.parser.parser, uvloop, aiohttp._http_parser" \
 && python -c "from stickyproxy.compiled import build; assert build() == 'compiled', build()" \
 && rm -rf /wheels

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
