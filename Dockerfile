# tritonvlm on NVIDIA's Triton container (Triton 2.51, the same version the local launcher runs).
#   docker build -t tritonvlm .
#   docker run --gpus all -p 8000:8000 -v /path/to/Qwen2.5-VL-7B-Instruct:/model tritonvlm --model /model
# Without --model it serves the built-in shapes demo model (models/tritonvlm-shapes-demo).
# The model runs on the GPU when CUDA is available (bf16), else on the CPU.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TRITONVLM_CACHE=/var/cache/tritonvlm

WORKDIR /opt/tritonvlm
# Dependencies first (cached layer): torch pinned and installed before the project, which must not
# resolve a different torch. tritonserver comes from the image, so no nvidia-pytriton wheel.
COPY pyproject.toml README.md ./
RUN pip install "torch==2.13.0"
COPY tritonvlm ./tritonvlm
COPY frontend ./frontend
COPY model_repository ./model_repository
COPY models ./models
RUN pip install -e . \
    && useradd --create-home --uid 1000 tritonvlm \
    && mkdir -p "$TRITONVLM_CACHE" && chown tritonvlm "$TRITONVLM_CACHE"
USER tritonvlm

# 8000: OpenAI API. Triton's own ports: 8001 gRPC, 8002 metrics, 8080 HTTP.
EXPOSE 8000 8001 8002 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["tritonvlm", "serve", "--host", "0.0.0.0", "--port", "8000", "--triton-host", "0.0.0.0", \
            "--triton-grpc-port", "8001", "--triton-metrics-port", "8002", "--triton-http-port", "8080"]
