"""API keys and what each may ask for.

With no keys configured the server is open (development): any valid config is accepted.
With keys, every request must carry one, and its config must fit the key's grant; a config
that asks for more is a 403 naming what was refused, before anything is generated. A key
without a grant of its own gets the operator's default grant: the default preset or stricter.

Grants file (``--grants``), YAML::

    keys:
      studio-key-123:            # the key itself, or "sha256:<hex digest of the key>"
        name: game-studio
        presets: [default, strict, game_development]
        allow: [violence, weapons]   # the most a request may allow
        annotate: false              # may it ask for on_violation: annotate
        max_threshold: 0.7           # highest threshold it may set (default: taxonomy's)
        max_tau: 5
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from safeserve.server.errors import APIError
from safeserve.server.safety_config import SafetyConfig


class Grant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    presets: list[str] = Field(default_factory=lambda: ["default", "strict"])
    allow: list[str] = Field(default_factory=list)
    annotate: bool = False
    max_threshold: float | None = None  # None: the taxonomy's default thresholds are the cap
    max_tau: int = 3


@dataclass(frozen=True)
class Principal:
    name: str
    grant: Grant | None  # None: open server, no limits


OPEN = Principal("anonymous", None)


class KeyRing:
    def __init__(self, keys: list[str], grants_path: Path | None, default_grant: Grant | None = None):
        self.default_grant = default_grant or Grant()
        self._plain: dict[str, Grant] = {k: self.default_grant for k in keys}
        self._hashed: dict[str, Grant] = {}
        if grants_path is not None:
            data = yaml.safe_load(Path(grants_path).read_text()) or {}
            for key, raw in (data.get("keys") or {}).items():
                grant = Grant(**(raw or {}))
                if str(key).startswith("sha256:"):
                    self._hashed[str(key)[7:].lower()] = grant
                else:
                    self._plain[str(key)] = grant

    @property
    def enabled(self) -> bool:
        return bool(self._plain or self._hashed)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return OPEN
        header = authorization or ""
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if token:
            for key, grant in self._plain.items():
                if secrets.compare_digest(token, key):
                    return Principal(grant.name, grant)
            digest = hashlib.sha256(token.encode()).hexdigest()
            for key, grant in self._hashed.items():
                if secrets.compare_digest(digest, key):
                    return Principal(grant.name, grant)
        raise APIError(401, "invalid or missing API key", type="authentication_error",
                       code="invalid_api_key")


def authorize_config(principal: Principal, preset: str | None, cfg: SafetyConfig,
                     default_thresholds: dict[str, float], default_preset: str,
                     default_tau: int = 3) -> None:
    """403 if the request asks for more than the principal's grant permits.

    Presets are written by the operator, so a granted preset is taken whole; a custom config
    is checked field by field. The operator's default preset is always permitted."""
    grant = principal.grant
    if grant is None or preset == default_preset:
        return
    refused: list[str] = []
    if preset is not None:
        if preset not in grant.presets:
            refused.append(f"preset '{preset}'")
    else:
        extra = sorted(set(cfg.allow) - set(grant.allow))
        if extra:
            refused.append(f"allow {extra}")
        if cfg.on_violation == "annotate" and not grant.annotate:
            refused.append("on_violation 'annotate'")
        # The head's own operating point is never more than a key may ask for.
        max_tau = max(grant.max_tau, default_tau)
        if cfg.tau is not None and cfg.tau > max_tau:
            refused.append(f"tau {cfg.tau} (max {max_tau})")
        if cfg.threshold is not None:
            items = (cfg.threshold.items() if isinstance(cfg.threshold, dict)
                     else ((c, cfg.threshold) for c in default_thresholds))
            for cat, value in items:
                cap = grant.max_threshold if grant.max_threshold is not None \
                    else default_thresholds.get(cat, 0.5)
                if value > cap + 1e-9:
                    refused.append(f"threshold {cat}={value} (max {cap})")
    if refused:
        raise APIError(403, f"API key '{principal.name}' may not request: " + "; ".join(refused),
                       type="permission_error", param="safety_config",
                       code="safety_config_not_permitted")
