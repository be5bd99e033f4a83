"""Server settings: CLI flags and ``SAFESERVE_*`` environment variables, validated once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    # inf / nan pass gt=0 otherwise (an infinite KV cache, a self-check that always passes)
    model_config = SettingsConfigDict(env_prefix="SAFESERVE_", extra="ignore",
                                      allow_inf_nan=False)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: Path | None = Field(None, description="HF model directory; default: the embedded SmolLM2")
    served_model_name: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    max_model_len: int = Field(2048, ge=16)
    kv_cache_gib: float = Field(1.0, gt=0, description="KV-cache memory (GiB)")
    max_num_seqs: int = Field(64, ge=1)
    enforce_eager: bool = False
    # NoDecode: the environment variable is comma-separated text, not JSON (an empty value is
    # no keys), so it must reach the validator below as the raw string.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="bearer tokens, comma-separated; empty = no auth")
    grants: Path | None = Field(None, description="YAML: API keys and what each may ask for")
    allow_unsafe: bool = Field(False, description="serve a model that has no safety head")
    safety_head: str | None = Field(
        None, description="safety head to compose with the model: a bundled one by name "
        "(default, guarded, strict) or a directory holding safety_head/ (and optionally adapter/)")
    presets: Path | None = Field(None, description="safety presets YAML (default: built-in)")
    default_preset: str = Field("default", description="preset for requests with no config")
    refusal_explain_sentences: int = Field(
        1, ge=-1, le=16, description="sentences the model may write after a spliced refusal "
        "before the response ends (0: none; -1: no limit); a request's explain_sentences overrides")
    max_moderation_tokens: int = Field(
        16384, ge=1, description="most prompt tokens one /v1/moderations request may send to "
        "the engine, all its inputs together; more is a 400")
    max_request_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024,
        description="largest request body accepted; larger ones get a 413 before they are parsed")
    head_check: Literal["error", "warn", "off"] = Field(
        "error", description="the head's startup self-check: its recorded prompt verdicts must "
        "be reproduced by this server (error: refuse to serve when they are not; warn: log and "
        "serve; off: skip)")
    head_check_tolerance: float | None = Field(
        None, gt=0, le=10, description="largest allowed self-check difference in logits (default: "
        "0.1 for float32, 1.0 for half precision)")
    shutdown_grace_s: float = Field(
        5.0, ge=0, le=3600, description="on SIGTERM / Ctrl-C, how long requests in flight may "
        "run on (a long stream included) before they are cut; new connections are refused "
        "at once")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("model", "grants", "presets", mode="before")
    @classmethod
    def _empty_path_is_none(cls, v):
        # compose's ${VAR:-} passes an empty value: that is "not set", not the current folder
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("grants", "presets")
    @classmethod
    def _a_file(cls, v):
        # found now, not after the model was converted or composed (minutes)
        if v is not None and not Path(v).is_file():
            raise ValueError(f"{v} is not a file")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, v):
        return v.lower() if isinstance(v, str) else v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        # the same reading for the variable's text and for repeated --api-key values: comma-
        # separated, spaces around a key dropped (the server strips the token it receives)
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)) and all(isinstance(k, str) for k in v):
            return [k.strip() for item in v for k in item.split(",") if k.strip()]
        return v
