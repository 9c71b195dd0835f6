# llama.cpp at one source commit, compiled ONCE with the CMake flags kvmatrix
# renders (the same function as the host runtime), plus the Python bindings
# built against that exact source. Build args (all set by kvmatrix.matrix.images):
#
#   BASE_IMAGE        local debootstrap base (CPU) or a CUDA devel image (GPU)
#   CMAKE_FLAGS       the build's flags, e.g. -DBUILD_SHARED_LIBS=ON ... -DGGML_CUDA=ON
#   BUILD_JOBS        parallel compile jobs
#   PIP_CMAKE_ARGS    the compute flags again, for the pip-compiled variant
#   WITH_PIP          1: add /opt/venvs/pip  (bindings compiled by pip, same flags)
#   WITH_STOCK        1: add /opt/venvs/stock (bindings as users install them: no CMAKE_ARGS)
#   RUNNER_REQUIREMENTS  what the runner imports (aiohttp, numpy)
#
# Context (assembled by kvmatrix): source/ = the llama.cpp tree,
# bindings/ = the matching llama-cpp-python sdist (extracted), ca/ = extra CA certificates.
# The runner is NOT baked in: it is mounted read-only at run time, so changing
# it never repeats the compile.
ARG BASE_IMAGE=kvmatrix/debian:bookworm
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git ca-certificates \
        python3 python3-venv python3-dev libgomp1 \
 && rm -rf /var/lib/apt/lists/*

# Extra CA certificates (TLS-intercepting proxies, private mirrors) for pip.
COPY ca/ /usr/local/share/ca-certificates/kvmatrix/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# 1. llama.cpp: llama-server + libllama.so from one configure. Older tags put the
#    shared libraries next to their sources; they are gathered into bin/ (LLAMA_CPP_LIB_PATH).
COPY source/ /opt/llama.cpp/src/
ARG CMAKE_FLAGS
ARG BUILD_JOBS=2
RUN cmake -S /opt/llama.cpp/src -B /opt/llama.cpp/build ${CMAKE_FLAGS} \
 && cmake --build /opt/llama.cpp/build -j ${BUILD_JOBS} --target llama-server llama \
 && for f in $(find /opt/llama.cpp/build -name 'lib*.so*' -not -path '*/bin/*'); do cp -Pn "$f" /opt/llama.cpp/build/bin/; done \
 && test -x /opt/llama.cpp/build/bin/llama-server && test -f /opt/llama.cpp/build/bin/libllama.so \
 && find /opt/llama.cpp/build -name '*.o' -delete

# 2. Bindings on THAT library (shared variant): no llama.cpp compile.
COPY bindings/ /opt/bindings/
ARG RUNNER_REQUIREMENTS="aiohttp>=3.9 numpy>=1.24"
RUN python3 -m venv /opt/venvs/shared && cp -r /opt/bindings /tmp/bindings \
 && CMAKE_ARGS="-DLLAMA_BUILD=OFF" /opt/venvs/shared/bin/pip install --quiet /tmp/bindings ${RUNNER_REQUIREMENTS} \
 && rm -rf /tmp/bindings
ENV LLAMA_CPP_LIB_PATH=/opt/llama.cpp/build/bin

# 3. Optional variants, each its own layer so adding one never rebuilds the others.
ARG PIP_CMAKE_ARGS=""
ARG WITH_PIP=0
RUN if [ "$WITH_PIP" = 1 ]; then python3 -m venv /opt/venvs/pip && cp -r /opt/bindings /tmp/bindings \
    && CMAKE_ARGS="${PIP_CMAKE_ARGS}" CMAKE_BUILD_PARALLEL_LEVEL=${BUILD_JOBS} \
       /opt/venvs/pip/bin/pip install --quiet /tmp/bindings ${RUNNER_REQUIREMENTS} && rm -rf /tmp/bindings; fi
ARG WITH_STOCK=0
RUN if [ "$WITH_STOCK" = 1 ]; then python3 -m venv /opt/venvs/stock && cp -r /opt/bindings /tmp/bindings \
    && CMAKE_BUILD_PARALLEL_LEVEL=${BUILD_JOBS} \
       /opt/venvs/stock/bin/pip install --quiet /tmp/bindings ${RUNNER_REQUIREMENTS} && rm -rf /tmp/bindings; fi

# (built with umask 022: world-readable already; chmod -R would copy every file into a new layer)
RUN useradd --create-home --uid 1000 kvmatrix
USER kvmatrix
WORKDIR /tmp
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
