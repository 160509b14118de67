# The pipeline's image: one image for every worker; the command picks the stage
# (`run --mode split --stage persist`), `migrate`, or `run` for everything fused.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY stages stages
COPY schemas schemas
COPY bench bench
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home pipeline

USER 10001
ENV PIPELINE_LOG_FORMAT=json \
    PIPELINE_HTTP_PORT=8000 \
    PIPELINE_API_PORT=8080
EXPOSE 8000 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
ENTRYPOINT ["pipeline"]
CMD ["run"]
