"""One config schema: every engine setting written in YAML reaches the engine unchanged (the
same typed objects, no dict round-trip) and shows in ``diagnose``; the seed's dict API is
validated by the same models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from bot.cli import main
from bot.config import parse_config
from engine import LLMManager, create_llm_manager
from engine.backends import create_backend
from engine.backends.openai_backend import OpenAIBackend
from engine.backends.process_backend import ProcessBackend
from engine.backends.scripted import ScriptedBackend
from engine.backends.transformers_backend import TransformersBackend
from engine.config import EngineConfig
from engine.errors import EngineConfigError

# A non-default value for every engine setting (key path → value). A new setting must be
# added here, or test_every_engine_setting_is_covered fails.
EVERY_SETTING: dict[str, Any] = {
    "models.llm.backend": "openai",
    "models.llm.model_path": "/models/Qwen3-8B",
    "models.llm.gguf_file": "model.Q4.gguf",
    "models.llm.device": "cuda:1",
    "models.llm.quantization": "int4",
    "models.llm.max_length": 4096,
    "models.llm.temperature": 0.35,
    "models.llm.top_p": 0.85,
    "models.llm.top_k": 40,
    "models.llm.repetition_penalty": 1.15,
    "models.llm.seed": 1234,
    "models.llm.max_batch_size": 16,
    "models.llm.batch_window_ms": 25.0,
    "models.llm.static_cache": "on",
    "models.llm.compile_decode": "off",
    "models.llm.continuous_batching": "off",
    "models.llm.prefix_cache_gb": 2.5,
    "models.llm.prefill_chunk_tokens": 256,
    "models.llm.engine_process": "on",
    "models.llm.openai.base_url": "http://127.0.0.1:9999/v1",
    "models.llm.openai.model": "qwen3-8b",
    "models.llm.openai.api_key_env": "MY_VLLM_KEY",
    "models.llm.openai.timeout_s": 12.5,
    "models.llm.openai.max_retries": 5,
    "models.llm.openai.max_in_flight": 4,
    "models.llm.openai.extra_sampling": False,
    "models.llm.scripted.replies": ["one {user_text}", "two"],
    "models.llm.scripted.chunk_delay_s": 0.25,
    "models.embedding.enabled": False,
    "models.embedding.device": "cuda:4",
    "models.embedding.model_path": "/models/Qwen3-Embedding-0.6B",
    "models.embedding.max_length": 512,
    "models.embedding.batch_size": 64,
    "models.embedding.quantization": "8bit",
    "vtuber.persona": "personas/mine.yaml",
    "vtuber.response.max_tokens": 90,
    "vtuber.response.min_tokens": 5,
    "vtuber.response.filter_repetition": False,
    "vtuber.response.max_input_chars": 800,
    "vtuber.response.enable_traditional_chinese": False,
    "vtuber.response.chinese_conversion": "s2hk",
    "vtuber.moderation.blocklist": ["(?i)kill yourself"],
}
# Not settable from YAML: the key comes from the environment variable api_key_env names.
FROM_ENVIRONMENT = {"models.llm.openai.api_key"}


def leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths |= leaf_paths(annotation, f"{prefix}{name}.")
        else:
            paths.add(prefix + name)
    return paths


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def lookup(data: Any, path: str) -> Any:
    for key in path.split("."):
        data = data[key] if isinstance(data, dict) else getattr(data, key)
    return data


def test_every_engine_setting_is_covered() -> None:
    assert leaf_paths(EngineConfig) - FROM_ENVIRONMENT == set(EVERY_SETTING)
    defaults = EngineConfig()
    unchanged = [p for p, v in EVERY_SETTING.items() if lookup(defaults, p) == v]
    assert unchanged == [], "each value must differ from its default"


def test_every_setting_from_yaml_reaches_the_engine(tmp_path: Path) -> None:
    config = parse_config(nested(EVERY_SETTING), env={"MY_VLLM_KEY": "sk-test"})
    manager = LLMManager(config.engine_config(), cache_dir=tmp_path)
    for path, value in EVERY_SETTING.items():
        assert lookup(manager.config, path) == value, path
    # The engine holds the very sections the application validated: one schema, one object.
    assert manager.config.embedding is config.models.embedding
    assert manager.config.vtuber is config.vtuber


def test_settings_reach_the_backends_and_sampling(tmp_path: Path) -> None:
    config = parse_config(nested(EVERY_SETTING), env={"MY_VLLM_KEY": "sk-test"})
    engine = config.engine_config()
    backend = create_backend(engine.llm, tmp_path)
    assert isinstance(backend, OpenAIBackend)
    assert backend.info()["base_url"] == "http://127.0.0.1:9999/v1"
    assert backend.info()["model"] == "qwen3-8b"
    assert (backend._timeout, backend._max_retries, backend._extra_sampling) == (12.5, 5, False)
    assert backend._limit.ceiling == 4
    assert backend._api_key == "sk-test"
    scripted = create_backend(engine.llm.model_copy(update={"backend": "scripted"}))
    assert isinstance(scripted, ScriptedBackend) and scripted._replies == ["one {user_text}",
                                                                          "two"]
    local = create_backend(engine.llm.model_copy(update={"backend": "transformers"}), tmp_path)
    assert isinstance(local, ProcessBackend) and local._config.max_batch_size == 16
    threaded = create_backend(engine.llm.model_copy(
        update={"backend": "transformers", "engine_process": "off"}), tmp_path)
    assert isinstance(threaded, TransformersBackend)
    sampling = engine.sampling()
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (
        0.35, 0.85, 40, 1234)
    assert (sampling.max_new_tokens, sampling.min_new_tokens,
            sampling.repetition_penalty) == (90, 5, 1.15)
    assert engine.response.conversion_mode == "s2hk"


def test_diagnose_shows_every_setting_and_no_secret(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(nested(EVERY_SETTING)), encoding="utf-8")
    monkeypatch.setenv("MY_VLLM_KEY", "sk-very-secret")
    code = main(["--config", str(path), "--data-dir", str(tmp_path / "data"),
                 "diagnose", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)
    assert code == 1 and report["issues"]  # its model paths do not exist here
    shown = report["engine_config"]
    for key, value in EVERY_SETTING.items():
        assert lookup(shown, key) == value, key
    assert "sk-very-secret" not in out


def test_api_key_in_yaml_is_refused() -> None:
    from bot.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"llm": {"openai": {"api_key": "sk-oops"}}}}, env={})
    assert any("api_key_env" in line for line in caught.value.problems)


async def test_seed_dict_is_validated_by_the_same_models() -> None:
    with pytest.raises(EngineConfigError) as caught:
        LLMManager({"models": {"llm": {"temperature": 9, "top_p": "x"}}})
    problems = caught.value.problems
    assert any(p.startswith("models.llm.temperature: 9 is not allowed") for p in problems)
    assert any(p.startswith("models.llm.top_p:") for p in problems)
    assert await create_llm_manager({"models": {"llm": {"backnd": "scripted"}}}) is None
    # Other top-level sections of a whole application config are not the engine's business.
    manager = LLMManager({"models": {"llm": {"backend": "scripted"}}, "adapters": {"x": 1}})
    assert manager.config.llm.backend == "scripted"


def test_a_short_max_tokens_alone_lowers_the_default_minimum() -> None:
    config = EngineConfig.from_mapping({"vtuber": {"response": {"max_tokens": 8}}})
    assert (config.response.max_tokens, config.response.min_tokens) == (8, 8)
    with pytest.raises(EngineConfigError, match="min_tokens"):
        EngineConfig.from_mapping({"vtuber": {"response": {"max_tokens": 8, "min_tokens": 9}}})


def test_the_embedded_model_gets_a_short_default_reply_length() -> None:
    from engine.config import DEFAULT_MAX_TOKENS, EMBEDDED_MAX_TOKENS

    embedded = EngineConfig.from_mapping({})
    assert embedded.sampling().max_new_tokens == EMBEDDED_MAX_TOKENS
    served = EngineConfig.from_mapping({"models": {"llm": {"backend": "openai"}}})
    assert served.sampling().max_new_tokens == DEFAULT_MAX_TOKENS
    chosen = EngineConfig.from_mapping({"vtuber": {"response": {"max_tokens": 200}}})
    assert chosen.sampling().max_new_tokens == 200


@pytest.mark.parametrize(("backend", "expected"), [("transformers", 16), ("openai", 32),
                                                   ("scripted", 4)])
def test_concurrent_generations_default_to_what_the_engine_batches(backend: str,
                                                                   expected: int) -> None:
    """Unless `limits.max_concurrent_generations` is set, the runtime lets as many replies
    generate at once as the engine batches: a GPU's 16 batch slots are not held to 4."""
    from bot.answer import Answerer

    config = parse_config({"models": {"llm": {"backend": backend, "max_batch_size": 16},
                                      "embedding": {"enabled": False}}}, env={})
    engine = LLMManager(config.engine_config())
    assert engine.parallel_requests() == expected
    answerer = Answerer(config, engine, store=None, context=None, clock=None)  # type: ignore[arg-type]
    assert answerer.generation_limit == expected
    pinned = parse_config({"limits": {"max_concurrent_generations": 2}}, env={})
    assert Answerer(pinned, engine, store=None, context=None,  # type: ignore[arg-type]
                    clock=None).generation_limit == 2
