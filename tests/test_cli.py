"""tr-serve's settings: defaults, YAML, flags over YAML, and the errors that exit with 2.
No server is started here."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
from tr_engine.server.settings import ServerSettings

from tr_engine.cli import ConfigError, build_parser, load_settings, serve_main
from tr_engine.config import EngineConfig

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return str(path)


def test_no_flags_gives_the_dataclass_defaults():
    assert load_settings([]) == (EngineConfig(), ServerSettings())


def test_every_config_field_has_a_flag():
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    for cls in (EngineConfig, ServerSettings):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in flags, f"{cls.__name__}.{f.name}"


def test_flags_reach_the_dataclasses():
    config, server = load_settings([
        "--model", "/m", "--device", "cpu", "--world-size", "3", "--dtype", "bfloat16",
        "--max-model-len", "4096", "--served-model-name", "m", "--attention-strategy", "ring",
        "--kv-cache-fraction", "0.5", "--kv-cache-tokens", "1000", "--prefill-chunk", "512",
        "--token-chunk", "256", "--max-num-seqs", "4", "--max-waiting", "9", "--seed", "7",
        "--host", "0.0.0.0", "--port", "9001", "--api-key", "k", "--log-level", "debug",
        "--graceful-shutdown-s", "3.5", "--retry-after-s", "4", "--default-max-tokens", "99",
        "--max-request-bytes", "5000000",
    ])
    assert config == EngineConfig(
        model="/m", device="cpu", world_size=3, dtype="bfloat16", max_model_len=4096,
        served_model_name="m", attention_strategy="ring", kv_cache_fraction=0.5,
        kv_cache_tokens=1000, prefill_chunk=512, token_chunk=256, max_num_seqs=4,
        max_waiting=9, seed=7)
    assert server == ServerSettings(host="0.0.0.0", port=9001, api_key="k", log_level="debug",
                                    graceful_shutdown_s=3.5, retry_after_s=4,
                                    default_max_tokens=99, max_request_bytes=5_000_000)


def test_flags_override_yaml(tmp_path):
    path = _yaml(tmp_path, "world_size: 4\ndevice: cpu\nport: 9000\nmax-num-seqs: 8\n")
    config, server = load_settings(["--config", path, "--world-size", "2"])
    assert (config.world_size, config.device, config.max_num_seqs) == (2, "cpu", 8)
    assert server.port == 9000


@pytest.mark.parametrize("text, needle", [
    ("world_size: 2\nbogus_knob: 1\n", "unknown key 'bogus_knob'"),
    ("world_size: two\n", "world_size"),
    ("world_size: yes\n", "world_size"),
    ("port: 8000.5\n", "port"),
    ("- a\n- b\n", "mapping"),
    ("world_size: [\n", "not valid YAML"),
    ("world_size: 0\n", "world_size must be a positive integer"),
    ("kv_cache_fraction: 1.5\n", "kv_cache_fraction"),
    ("max_request_bytes: 10\n", "max_request_bytes must be an integer >= 1024"),
])
def test_bad_yaml_is_a_config_error(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(["--config", _yaml(tmp_path, text)])


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    assert serve_main(["--config", _yaml(tmp_path, "bogus_knob: 1\n")]) == 2
    assert serve_main(["--world-size", "0"]) == 2
    assert serve_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("tr-serve: ") for line in lines)
    assert "bogus_knob" in lines[0] and "world_size" in lines[1] and "missing.yaml" in lines[2]


def test_bad_flag_exits_2():
    with pytest.raises(SystemExit) as e:
        load_settings(["--dtype", "int3"])
    assert e.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_backend_exits_2_with_what_and_fix(capsys):
    assert serve_main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "CUDA" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("name, device, world_size, tp", [
    ("cpu-demo.yaml", "cpu", 2, 1),
    ("gpu-1.yaml", "cuda", 1, 1),
    ("gpu-8.yaml", "cuda", 8, 1),
    ("ascend-910b-8.yaml", "npu", 8, 1),
    ("ascend-910b-8-tp.yaml", "npu", 8, 4),
])
def test_presets_load(name, device, world_size, tp):
    config, server = load_settings(["--config", str(CONFIGS / name)])
    assert (config.device, config.world_size) == (device, world_size)
    assert config.tensor_parallel_size == tp
    if device != "cpu":
        assert config.dtype == "bfloat16"
    assert isinstance(server, ServerSettings)


def test_tensor_parallel_flags(capsys, monkeypatch):
    config, _ = load_settings(["-tp", "2", "--world-size", "4"])
    assert (config.tensor_parallel_size, config.sequence_parallel_size) == (2, 2)
    assert serve_main(["--device", "cpu", "--world-size", "4",
                       "--tensor-parallel-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "tensor_parallel_size 3 does not divide world_size 4" in err
    assert "Traceback" not in err
    # under torchrun the world size is torchrun's unless given, so -tp alone is enough
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    config, _ = load_settings(["-tp", "2"])
    assert (config.world_size, config.sequence_parallel_size) == (4, 2)
