"""The torch_npu ops the NPU backend calls against their schemas in the pinned wheels
(tests/torch_npu_schemas.py): the stand-in takes exactly the newest release's arguments,
and every call the backend makes binds to the schema of each pinned release."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import npu_standin
import pytest
import torch
from test_npu_backend import hccl_env_restored, merge_cases, qkv
from torch_npu_schemas import NEWEST, SCHEMAS
from tr_engine.backends.npu import COMPATIBLE, NpuBackend

sys.path.insert(0, str(Path(__file__).parent / "tools"))
from npu_schemas import schema_lines  # noqa: E402


def _default(text: str):
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    if text[0] == '"':
        return text[1:-1]
    return float(text) if "." in text else int(text)


def signature(schema: str) -> inspect.Signature:
    """The Python signature a schema line stands for: arguments before `*` positional or
    keyword, after it keyword-only; defaults as Python values."""
    args = schema[schema.index("(") + 1 : schema.index(") ->")]
    params, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for arg in args.split(", "):
        if arg == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        _, name = arg.split(" ", 1)
        name, _, default = name.partition("=")
        params.append(inspect.Parameter(
            name, kind, default=_default(default) if default else inspect.Parameter.empty))
    return inspect.Signature(params)


def test_every_pinned_release_has_its_schemas():
    assert set(SCHEMAS) == set(COMPATIBLE) and NEWEST in SCHEMAS
    for release, ops in SCHEMAS.items():
        assert set(ops) == {"npu_fused_infer_attention_score", "npu_fusion_attention",
                            "npu_ring_attention_update"}, release
        for op, line in ops.items():
            assert line is None or line.startswith(op + "("), (release, op)
    assert SCHEMAS["2.9.0.post2"]["npu_ring_attention_update"] is None  # from 26.1.0 on


@pytest.mark.parametrize("op", list(SCHEMAS[NEWEST]))
def test_standin_takes_exactly_the_newest_schema(op):
    want = signature(SCHEMAS[NEWEST][op])
    got = inspect.signature(getattr(npu_standin, op))
    assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
        (p.name, p.kind, p.default) for p in want.parameters.values()]


def test_signature_parser_on_one_schema():
    sig = signature('f(Tensor a, int n, *, Tensor? m=None, float s=1., str l="BSH", '
                    'bool b=False, int k=2147483647) -> Tensor')
    assert str(sig) == "(a, n, *, m=None, s=1.0, l='BSH', b=False, k=2147483647)"


@pytest.fixture
def recorded(monkeypatch):
    """The stand-in with every schema op wrapped to record its (args, kwargs)."""
    calls = []
    with hccl_env_restored(), npu_standin.install() as module:
        for op in SCHEMAS[NEWEST]:
            real = getattr(module, op)

            def wrapper(*args, _op=op, _real=real, **kwargs):
                calls.append((_op, args, kwargs))
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, op, wrapper)
        yield NpuBackend(), calls


def test_backend_passes_only_what_each_pinned_schema_has(recorded):
    backend, calls = recorded
    for seed, (tq, tk, causal, dtype) in enumerate([
            (16, 16, True, torch.bfloat16), (8, 16, False, torch.bfloat16),
            (1, 20, False, torch.float16), (16, 16, True, torch.float32),
            (1, 20, False, torch.float32)]):
        backend.attention(*qkv(tq, tk, 4, 2, 64, dtype, seed), causal)
    backend.merge_(*merge_cases(0))
    backend.self_check(torch.device("cpu"))
    assert {op for op, _, _ in calls} == set(SCHEMAS[NEWEST])  # every op was called
    for ops in SCHEMAS.values():
        for op, args, kwargs in calls:
            if ops[op] is None:  # absent from this release: the backend looks it up first
                continue
            signature(ops[op]).bind(*args, **kwargs)  # TypeError on any argument it lacks


def test_the_extraction_script_reads_the_custom_section():
    text = "\n".join([
        "autograd:", "- func: npu_fusion_attention(Tensor wrong) -> Tensor",
        "custom:", "- exposed: true",
        "  func: npu_ring_attention_update(Tensor a, *, str l=\"SBH\") -> Tensor",
        "  impl_ns: op_api",
        "- func: npu_fused_infer_attention_score(Tensor q) -> (Tensor, Tensor)",
        "- func: npu_fused_infer_attention_score.out(Tensor q, *, Tensor(a!) o) -> Tensor(a!)",
        "symint:", "- func: npu_fusion_attention(Tensor later) -> Tensor",
    ])
    assert schema_lines(text) == {
        "npu_ring_attention_update": 'npu_ring_attention_update(Tensor a, *, str l="SBH") '
                                     "-> Tensor",
        "npu_fused_infer_attention_score": "npu_fused_infer_attention_score(Tensor q) -> "
                                           "(Tensor, Tensor)",
    }
