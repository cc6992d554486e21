"""Print the schema lines of the torch_npu ops backends/npu.py calls, read from a wheel.

    pip download --no-deps torch-npu==2.10.0.post4 -d /tmp/npuwheel   # do not install it
    python tests/tools/npu_schemas.py /tmp/npuwheel/torch_npu-2.10.0.post4-*.whl

For a version bump: the output is the entry to put in tests/torch_npu_schemas.py (SCHEMAS),
after which tests/test_npu_schemas.py holds the stand-in and the backend to it. Not run by
the test suite (it needs the wheel, which the tests do not download). Reads only the wheel's
codegen file; nothing is imported from it.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import zipfile
from pathlib import Path

CODEGEN = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
OPS = ("npu_fused_infer_attention_score", "npu_fusion_attention", "npu_ring_attention_update")


def schema_lines(text: str, ops=OPS) -> dict[str, str]:
    """op -> its `func:` line in the yaml's `custom:` section (the ops torch_npu exposes as
    torch_npu.<op>); the overloads (`op.out`) and later sections (`symint:`) are skipped."""
    found: dict[str, str] = {}
    section = None
    for line in text.splitlines():
        top = re.match(r"^(\w+):", line)
        if top:
            section = top.group(1)
            continue
        m = re.match(r"^-?\s*func:\s*((\w+)\(.*)$", line)
        if section == "custom" and m and m.group(2) in ops:
            found.setdefault(m.group(2), m.group(1).strip())
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path)
    wheel = p.parse_args(argv).wheel
    with zipfile.ZipFile(wheel) as z:
        text = z.read(CODEGEN).decode()
        version = next(re.search(r"^Version: (\S+)$", z.read(n).decode(), re.M).group(1)
                       for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = schema_lines(text)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    print(f"    # {wheel.name}\n    # sha256 {digest}")
    print(f"    {version!r}: {{")
    for op in OPS:  # an op the release lacks is None: the backend must look it up first
        line = lines.get(op)
        print(f"        {op!r}: {line!r},  # noqa: E501" if line else f"        {op!r}: None,")
    print("    },")
    return 0

if __name__ == "__main__":
    sys.exit(main())
