"""``safeserve bench config``: the per-request cost of parsing, authorizing and compiling a
safety config, timed in-process (no server, no engine) for each way a request can carry one.
"""

from __future__ import annotations

import time

import typer

def _config_cases() -> dict[str, tuple[str | None, dict | None]]:
    """(X-Safety-Config header, body safety_config) of each timed case."""
    return {
        "no config (default preset)": (None, None),
        "preset in header": ("game_development", None),
        "JSON object in header": ('{"allow": ["violence"], "threshold": {"weapons": 0.3}, '
                                  '"on_violation": "stop", "holdback": true}', None),
        "object in body": (None, {"allow": ["weapons"], "threshold": 0.4, "tau": 2,
                                  "guideline": "Fictional battles are fine."}),
    }


def config_timings(iterations: int) -> list[tuple[str, float]]:
    """(case, microseconds per request) of parsing, authorizing and compiling each case's
    config, as a key with a grant that allows every case."""
    from safeserve.models.taxonomy import Taxonomy
    from safeserve.server.auth import Grant, Principal
    from safeserve.server.safety_config import SafetyPolicy
    from safeserve.server.safety_service import SafetyService
    from safeserve.server.safety_tracker import TelemetryHub

    svc = SafetyService(SafetyPolicy(Taxonomy.load()), TelemetryHub(), lambda: None)
    svc._refusal_ids = list(range(12))  # tokenization happens once per server, not per request
    # guideline: the body case brings its own, which a grant must allow (server/auth.py)
    who = Principal("studio", Grant(presets=["default", "game_development"],
                                    allow=["violence", "weapons"], guideline=True))
    rows = []
    for name, (header, body) in _config_cases().items():
        t0 = time.perf_counter()
        for i in range(iterations):
            req = svc.resolve(header, body)
            svc.authorize(who, req)
            svc.policy.compile(req.config, f"r{i}", svc._refusal_ids, 2)
        rows.append((name, (time.perf_counter() - t0) / iterations * 1e6))
    return rows


def bench_config(iterations: int = typer.Option(20000, min=1, help="requests to time per case")):
    """Per-request cost of safety-config parsing, authorization and compilation."""
    typer.echo("| case | us / request |\n|---|---|")
    for name, us in config_timings(iterations):
        typer.echo(f"| {name} | {us:.1f} |")
