"""NPU backend (Huawei Ascend): HCCL for communication, torch_npu fused attention.

torch_npu is imported only when this backend is chosen.
"""

from __future__ import annotations

from .base import Backend
from .errors import BackendUnavailable


def import_torch_npu():
    """Import torch_npu, or raise BackendUnavailable with what is missing and how to fix it."""
    try:
        import torch_npu  # noqa: F401
    except ImportError as e:
        if "torch_npu" in str(e) and "No module named" in str(e):
            raise BackendUnavailable(
                "torch_npu is not installed, so the NPU backend cannot start.",
                "Install the Ascend CANN toolkit, then `pip install 'tr_engine[npu]'` "
                "(torch-npu matching your torch), or use --device cuda/cpu.",
            ) from e
        raise BackendUnavailable(
            f"torch_npu is installed but cannot load: {e}",
            "Source the Ascend toolkit first (`source /usr/local/Ascend/ascend-toolkit/set_env.sh`)"
            " and check that the CANN and torch-npu versions match.",
        ) from e
    except OSError as e:
        raise BackendUnavailable(
            f"torch_npu is installed but cannot load the Ascend libraries: {e}",
            "Source the Ascend toolkit first "
            "(`source /usr/local/Ascend/ascend-toolkit/set_env.sh`).",
        ) from e
    import torch_npu

    return torch_npu


class NpuBackend(Backend):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"

    def __init__(self) -> None:
        self.torch_npu = import_torch_npu()

    def _attention(self, q, k, v, causal, scale):
        raise NotImplementedError("NPU attention")
