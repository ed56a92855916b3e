# zerodown edge proxy image: runs `zerodown proxy` as a non-root user.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /srv/zerodown --create-home zerodown
WORKDIR /srv/zerodown
COPY pyproject.toml README.md ./
COPY zerodown_proxy ./zerodown_proxy
COPY orchestrator ./orchestrator
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir . && rm -rf /root/.cache

USER zerodown
# HTTP, HSMS; the admin API stays on loopback unless the config says otherwise.
EXPOSE 8080 5000
ENTRYPOINT ["zerodown", "proxy"]
CMD ["--config", "/etc/zerodown/proxy.toml"]
