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

    from tr_engine.models.embedded import embedded_model_path

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


def test_embedded_chat_template_appends_turns():
    """Turn n+1 renders as turn n (with its generation prompt), the reply and the new
    message: so every chat turn's prompt starts with the last one's and hits the prefix
    cache. Three turns, with and without a system message."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from tr_engine.models.embedded import embedded_model_path

    tok = AutoTokenizer.from_pretrained(embedded_model_path())

    def encode(messages):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    for start in ([], [{"role": "system", "content": "You answer briefly."}]):
        conv = [*start, {"role": "user", "content": "What is 2+2?"}]
        for reply, question in (("4.", "And 3+3?"), ("6.", "Why?")):
            before = encode(conv)
            conv = [*conv, {"role": "assistant", "content": reply},
                    {"role": "user", "content": question}]
            after = encode(conv)
            assert after[: len(before)] == before
            reply_ids = tok.encode(reply, add_special_tokens=False)
            assert after[len(before) : len(before) + len(reply_ids)] == reply_ids
