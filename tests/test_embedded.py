"""The embedded default model (SmolLM2-135M-Instruct) against transformers on the same
converted weights, on one and two gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tr_engine import LLM, SamplingParams


@pytest.mark.parametrize("world", [1, 2])
def test_embedded_smollm2_matches_transformers(world):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from tr_engine.embedded import embedded_model_path

    path = embedded_model_path()
    messages = [{"role": "user", "content": "What is 2+2?"}]
    with LLM(None, device="cpu", world_size=world, dtype="float32") as llm:
        out = llm.chat(messages, SamplingParams(max_tokens=20, temperature=0))[0]
        prompt = out.prompt_token_ids
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    ref = ref[0, len(prompt):].tolist()
    eos = hf.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    if ref[-1] in eos:
        assert out.finish_reason == "stop"
    assert out.token_ids == ref
    assert "4" in out.text
