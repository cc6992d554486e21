"""`tr-serve --device npu` on a machine without a usable torch_npu: exit status 2, two lines, no
traceback. Runs the real console script in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tr_engine.backends import BackendUnavailable
from tr_engine.backends.npu import import_torch_npu


def serve_command() -> list[str]:
    """The venv's tr-serve next to this interpreter, else the same entry point via -c."""
    script = Path(sys.executable).with_name("tr-serve")
    if script.exists():
        return [str(script)]
    code = "import sys; from tr_engine.cli import serve_main; sys.exit(serve_main())"
    return [sys.executable, "-c", code]


def serve_npu_two_lines(cwd, pythonpath: str | None = None) -> list[str]:
    """Run `tr-serve --device npu` (HCCL settings of this shell left out); check that it
    exits 2 with two lines on stderr and no traceback, and return the lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HCCL_", "P2P_HCCL"))}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    proc = subprocess.run([*serve_command(), "--device", "npu"], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=env)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 2, proc.stderr
    return lines


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None,
                    reason="torch_npu is installed here")
def test_serve_on_npu_without_torch_npu_exits_2_with_two_lines(tmp_path):
    with pytest.raises(BackendUnavailable) as expected:
        import_torch_npu()
    lines = serve_npu_two_lines(tmp_path)
    assert expected.value.what in lines[0] and expected.value.fix in lines[1]


# What torch_npu 2.10 raises at import next to a CUDA build of torch (its __init__.py).
ACCELERATORS = ("Two accelerators cannot be used at the same time in PyTorch: npu and cuda. "
                "You can install the cpu version of PyTorch to use your npu device,\\n"
                "or use the cuda device with other accelerators.")


@pytest.mark.parametrize("error,named", [
    (f'RuntimeError("{ACCELERATORS}")', "RuntimeError: Two accelerators"),
    ('ValueError("bad SOC_VERSION")', "ValueError: bad SOC_VERSION"),
])
def test_serve_on_npu_with_a_torch_npu_that_raises_exits_2_with_two_lines(tmp_path, error,
                                                                          named):
    """A torch_npu whose import raises something other than ImportError/OSError (a fake
    package on PYTHONPATH, not the stand-in) is reported like a missing one: exit 2, two
    lines naming the exception, no traceback."""
    package = tmp_path / "site" / "torch_npu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise {error}\n")
    lines = serve_npu_two_lines(tmp_path, str(tmp_path / "site"))
    assert lines[0].startswith("tr-serve: importing torch_npu failed with ") and named in lines[0]
    if "Two accelerators" in named:
        assert "CPU build of torch" in lines[1]
    else:
        assert "docs/deploy-ascend.md" in lines[1]
