"""The HTTP layer on its own (no engine started): authentication, safety-config
authorization (403 before anything is generated), and fail-closed startup."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from safeserve.models.checkpoint import SafetyHead
from safeserve.models.taxonomy import Taxonomy
from safeserve.server.app import create_app
from safeserve.server.engine import Engine, EngineSpec
from safeserve.server.safety_config import SafetyPolicy
from safeserve.server.safety_tracker import TelemetryHub
from safeserve.server.settings import Settings

SAFESERVE = str(Path(sys.executable).with_name("safeserve"))
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def client(tmp_path):
    grants = tmp_path / "grants.yaml"
    hashed = hashlib.sha256(b"hashed-key").hexdigest()
    grants.write_text(f"""
keys:
  studio-key:
    name: studio
    presets: [default, game_development]
    allow: [violence, weapons]
  sha256:{hashed}:
    name: hashed
    annotate: true
""")
    settings = Settings(api_keys=["plain-key"], grants=grants)
    spec = EngineSpec(model_dir=tmp_path, served_name="m", has_head=True, safety_enabled=True)
    app = create_app(Engine(settings, spec), (SafetyPolicy(Taxonomy.load()), TelemetryHub()))
    return TestClient(app)  # no context manager: the lifespan (engine start) does not run


def post(client, key, cfg=None, **extra):
    body = {"model": "m", "messages": MSG, **extra}
    if cfg is not None:
        body["safety_config"] = cfg
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_missing_or_wrong_key_is_401(client):
    for key in (None, "wrong"):
        r = post(client, key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer plain-key"}).status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key


def test_every_response_has_a_request_id_and_5xx_say_whether_to_retry(client):
    """The official client reads x-request-id (``_request_id``, and on its errors); it retries
    any 5xx unless told otherwise, so a loading engine says when to come back."""
    ids = set()
    for r in (client.get("/health"), post(client, None), client.get("/v1/models"),
              post(client, "plain-key")):
        assert r.headers["x-request-id"].startswith("req-")
        ids.add(r.headers["x-request-id"])
    assert len(ids) == 4
    loading = post(client, "plain-key")  # the engine was never started here
    assert loading.status_code == 503 and loading.json()["error"]["code"] == "engine_not_ready"
    assert loading.headers["retry-after"] == "5"
    from safeserve.server.errors import APIError

    dead = APIError(503, "gone", type="server_error", code="engine_dead").response()
    assert dead.headers["x-should-retry"] == "false"


def test_a_message_name_is_bounded(client):
    """The guideline-header check reads a message's `name` whole: an 8 MB one would hold the
    interpreter for seconds, so it is bounded like OpenAI's (a 400 naming it)."""
    long_name = [{"role": "user", "content": "hi", "name": "x" * 257}]
    r = post(client, "plain-key", messages=long_name)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.name", r.text


def test_key_without_grant_cannot_loosen_safety(client):
    for cfg, what in [({"allow": ["violence"]}, "allow ['violence']"),
                      ({"on_violation": "annotate"}, "annotate"),
                      ({"threshold": 0.9}, "threshold"),
                      ({"tau": 8}, "tau 8"),
                      ("game_development", "preset 'game_development'")]:
        r = post(client, "plain-key", cfg)
        assert r.status_code == 403, (cfg, r.text)
        err = r.json()["error"]
        assert err["code"] == "safety_config_not_permitted" and what in err["message"]


def test_stricter_configs_and_granted_ones_pass_authorization(client):
    # 503 = authorized and validated, stopped only because the engine is not started
    assert post(client, "plain-key").status_code == 503
    assert post(client, "plain-key", {"threshold": 0.2, "on_violation": "stop"}).status_code == 503
    assert post(client, "plain-key", "strict").status_code == 503
    assert post(client, "studio-key", {"allow": ["violence", "weapons"]}).status_code == 503
    assert post(client, "studio-key", "game_development").status_code == 503
    assert post(client, "hashed-key", {"on_violation": "annotate"}).status_code == 503
    r = post(client, "studio-key", {"allow": ["drugs"]})
    assert r.status_code == 403 and "drugs" in r.json()["error"]["message"]


def test_head_operating_point_tau_is_the_default_and_never_refused():
    """A head that names its own tau (`train operating-point`): requests without tau get it,
    the echo says so, and a key may always ask for it (it is the ceiling without a max_tau)."""
    from safeserve.server.auth import Grant, Principal
    from safeserve.server.safety_service import SafetyService

    svc = SafetyService(SafetyPolicy(Taxonomy.load(), default_tau=5), TelemetryHub(), lambda: None)
    svc._refusal_ids = [1]
    req = svc.resolve(None, None)
    assert req.tau == 5 and req.echo()["tau"] == 5
    assert svc.policy.compile(req.config, "r", [1], 2).tau == 5
    plain = Principal("plain", Grant())  # no max_tau: the head's tau is the ceiling
    svc.authorize(plain, svc.resolve(None, {"tau": 5}))
    assert svc.resolve(None, {"tau": 2}).echo()["tau"] == 2
    from safeserve.server.errors import APIError

    with pytest.raises(APIError) as err:
        svc.authorize(plain, svc.resolve(None, {"tau": 6}))
    assert err.value.status == 403 and "tau 6 (max 5)" in err.value.message


def test_explanation_budget_comes_from_the_operator_unless_the_request_names_one(tmp_path):
    """The operator's --refusal-explain-sentences is every request's default and ceiling
    (-1: no limit); a request may ask for fewer; the effective value is echoed and compiled."""
    from safeserve.server.auth import Grant, Principal
    from safeserve.server.launch import build_safety
    from safeserve.server.safety_service import SafetyService

    tax = Taxonomy.load()
    SafetyHead(torch.zeros(tax.num_outputs, 8), torch.zeros(tax.num_outputs), tax).save(tmp_path)
    spec = EngineSpec(model_dir=tmp_path, served_name="m", has_head=True, safety_enabled=True)
    for operator, asked, want in ((1, None, 1), (-1, None, -1), (-1, 4, 4), (2, 0, 0), (2, 2, 2)):
        policy, _ = build_safety(spec, Settings(refusal_explain_sentences=operator))
        svc = SafetyService(policy, TelemetryHub(), lambda: None)
        req = svc.resolve(None, None if asked is None else {"explain_sentences": asked})
        svc.authorize(Principal("plain", Grant()), req)
        assert req.echo()["explain_sentences"] == want
        assert policy.compile(req.config, "r", [1], 2).explain_sentences == want
    from safeserve.server.errors import APIError

    policy, _ = build_safety(spec, Settings(refusal_explain_sentences=1))
    with pytest.raises(APIError) as err:  # the operator's value is also the ceiling
        policy.resolve('{"explain_sentences": 2}', None)
    assert err.value.status == 400 and "at most 1" in err.value.message
    assert err.value.body()["error"]["param"] == "X-Safety-Config.explain_sentences"
    with pytest.raises(ValueError):
        Settings(refusal_explain_sentences=-2)
    with pytest.raises(ValueError):
        SafetyPolicy(tax, explain_sentences=99)


def test_server_takes_tau_from_the_heads_operating_point(tmp_path):
    from safeserve.server.launch import build_safety

    tax = Taxonomy.load()
    for extra, want in (({"operating_point": {"tau": 5}}, 5), ({}, 3)):
        d = tmp_path / str(want)
        SafetyHead(torch.zeros(tax.num_outputs, 8), torch.zeros(tax.num_outputs), tax,
                   extra=extra).save(d)
        spec = EngineSpec(model_dir=d, served_name="m", has_head=True, safety_enabled=True)
        policy, _ = build_safety(spec, Settings())
        assert policy.default_tau == want


def test_heads_alert_band_is_compiled_echoed_and_capped_by_the_requests_tau(tmp_path):
    """A head with an alert band: every request's row args carry it (e^margin, the band's
    tau, never above the request's own), the echo shows it; a bad band is a startup error."""
    import math

    from safeserve.server.launch import StartupError, build_safety
    from safeserve.server.safety_service import SafetyService

    tax = Taxonomy.load()
    d = tmp_path / "band"
    SafetyHead(torch.zeros(tax.num_outputs, 8), torch.zeros(tax.num_outputs), tax,
               extra={"operating_point": {"tau": 4, "alert_margin": 0.5, "alert_tau": 2}}).save(d)
    policy, _ = build_safety(EngineSpec(model_dir=d, served_name="m", has_head=True,
                                        safety_enabled=True), Settings())
    svc = SafetyService(policy, TelemetryHub(), lambda: None)
    req = svc.resolve(None, None)
    assert req.echo()["alert_margin"] == 0.5 and req.echo()["alert_tau"] == 2
    args = policy.compile(req.config, "r", [1], 2)
    assert args.tau == 4 and args.alert_tau == 2 and args.tau_alerted == 2
    assert args.alert_scale == pytest.approx(math.exp(0.5))
    one = svc.resolve(None, {"tau": 1})
    assert policy.compile(one.config, "r", [1], 2).alert_tau == 1 and one.echo()["alert_tau"] == 1
    plain = SafetyPolicy(tax).compile(req.config, "r", [1], 2)  # no band
    assert plain.alert_scale == 1.0 and plain.tau_alerted == plain.tau
    bad = tmp_path / "bad"
    SafetyHead(torch.zeros(tax.num_outputs, 8), torch.zeros(tax.num_outputs), tax,
               extra={"operating_point": {"alert_margin": 0.5}}).save(bad)
    with pytest.raises(StartupError, match="alert_tau"):
        build_safety(EngineSpec(model_dir=bad, served_name="m", has_head=True,
                                safety_enabled=True), Settings())
    for offset in ("2", float("nan"), 80.0):  # the prompt offset: a number of logits
        SafetyHead(torch.zeros(tax.num_outputs, 8), torch.zeros(tax.num_outputs), tax,
                   extra={"operating_point": {"prompt_logit_offset": offset}}).save(bad)
        with pytest.raises(StartupError, match="prompt_logit_offset"):
            build_safety(EngineSpec(model_dir=bad, served_name="m", has_head=True,
                                    safety_enabled=True), Settings())


def test_validation_precedes_authorization(client):
    r = post(client, "plain-key", {"allow": ["dragons"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "safety_config.allow"


def run_serve(*args, timeout=120, env=None):
    from conftest import server_env

    return subprocess.run([SAFESERVE, "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=server_env(env))


def test_fail_closed_without_a_head(base_model_dir):
    r = run_serve("--model", str(base_model_dir), "--port", "1")
    assert r.returncode != 0
    assert "--allow-unsafe" in r.stderr and "no safety head" in r.stderr


def test_allow_unsafe_resolves_a_headless_spec_and_its_absence_refuses(base_model_dir):
    """What is served, without an engine: a model without a safety head is refused, naming
    the flag, unless --allow-unsafe, which serves it with safety off (no head, no logits
    processor, no HTTP safety path) and says so in /v1/models' summary."""
    from safeserve.server.launch import StartupError, build_safety, resolve_spec

    with pytest.raises(StartupError) as refused:
        resolve_spec(Settings(model=base_model_dir))
    message = str(refused.value)
    assert message.startswith("safeserve: ") and "has no safety head" in message, message
    assert "refusing to serve it without --allow-unsafe" in message, message

    settings = Settings(model=base_model_dir, allow_unsafe=True, served_model_name="m")
    spec = resolve_spec(settings)
    assert spec.model_dir == base_model_dir.resolve() and spec.served_name == "m"
    assert not spec.has_head and not spec.safety_enabled
    assert spec.hf_overrides is None and spec.logits_processors is None
    assert spec.safety_summary() == {"enabled": False, "model_has_head": False,
                                     "unsafe_allowed": True}
    assert build_safety(spec, settings) is None


def test_head_that_does_not_fit_is_a_startup_error(tmp_path, base_model_dir):
    from safeserve.models.model_store import compose_checkpoint

    tax = Taxonomy.load()
    bad_hidden = SafetyHead(torch.zeros(tax.num_outputs, 100), torch.zeros(tax.num_outputs), tax)
    bad_hidden.save(tmp_path / "h1")
    model = compose_checkpoint(base_model_dir, tmp_path / "h1", root=tmp_path / "m1")
    r = run_serve("--model", str(model), "--port", "1")
    assert r.returncode != 0 and "hidden size 100" in r.stderr

    bad_rows = SafetyHead(torch.zeros(4, 576), torch.zeros(4), tax)
    with pytest.raises(ValueError):
        bad_rows.validate()
    (tmp_path / "h2" / "safety_head").mkdir(parents=True)
    bad_hidden.save(tmp_path / "h2")
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(4, 576), "bias": torch.zeros(4)},
              str(tmp_path / "h2" / "safety_head" / "head.safetensors"))
    model = compose_checkpoint(base_model_dir, tmp_path / "h2", root=tmp_path / "m2")
    r = run_serve("--model", str(model), "--port", "1")
    assert r.returncode != 0 and "taxonomy needs" in r.stderr


def test_misspelt_setting_variables_and_incomplete_heads_stop_the_server(tmp_path, base_model_dir):
    # SAFESERVE_API_KEY (for ..._KEYS) would otherwise leave the server open without a word
    r = run_serve("--port", "1", env={"SAFESERVE_API_KEY": "secret"})
    assert r.returncode == 1 and "SAFESERVE_API_KEY" in r.stderr.splitlines()[-1], r.stderr
    assert "Traceback" not in r.stderr
    # a head asked for whose weights were lost in a copy: an error, even with --allow-unsafe
    tax = Taxonomy.load()
    SafetyHead(torch.zeros(tax.num_outputs, 576), torch.zeros(tax.num_outputs), tax).save(
        tmp_path / "h")
    (tmp_path / "h" / "safety_head" / "head.safetensors").unlink()
    r = run_serve("--model", str(base_model_dir), "--safety-head", str(tmp_path / "h"),
                  "--allow-unsafe", "--port", "1")
    assert r.returncode != 0 and "head.safetensors" in r.stderr, r.stderr


def test_a_port_in_use_fails_before_the_engine_is_built(base_model_dir):
    """uvicorn binds after the app's startup, which starts the engine's build: a busy port
    cost a whole model load (minutes) before the exit. It is bound first now."""
    import socket
    import time

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        t0 = time.time()
        r = run_serve("--model", str(base_model_dir), "--allow-unsafe", "--port",
                      str(busy.getsockname()[1]))
        elapsed = time.time() - t0
    finally:
        busy.close()
    assert r.returncode == 1, r.stderr
    assert "cannot listen on 127.0.0.1" in r.stderr.splitlines()[-1], r.stderr
    assert "Traceback" not in r.stderr and "engine ready" not in r.stderr
    assert elapsed < 60


def test_composed_models_are_keyed_by_their_base_too(tmp_path, base_model_dir):
    import shutil

    from safeserve.models.model_store import compose_checkpoint

    tax = Taxonomy.load()
    SafetyHead(torch.zeros(tax.num_outputs, 576), torch.zeros(tax.num_outputs), tax).save(
        tmp_path / "h")
    one, two = tmp_path / "a" / "model", tmp_path / "b" / "model"  # one folder name, two bases
    for d in (one, two):
        d.mkdir(parents=True)
        shutil.copy(base_model_dir / "config.json", d / "config.json")
    (two / "config.json").write_text((two / "config.json").read_text().replace("{", '{"x": 1, ', 1))
    a = compose_checkpoint(one, tmp_path / "h", root=tmp_path / "store")
    b = compose_checkpoint(two, tmp_path / "h", root=tmp_path / "store")
    assert a != b and a.name.startswith("model-safeserve-")
    assert compose_checkpoint(one, tmp_path / "h", root=tmp_path / "store") == a


def test_unknown_model_dir_is_a_startup_error(tmp_path):
    r = run_serve("--model", str(tmp_path), "--port", "1")
    assert r.returncode != 0 and "config.json" in r.stderr


def test_a_user_message_without_content_is_a_400(client):
    r = post(client, "plain-key", messages=[{"role": "user"}])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages.0.content" and "required" in err["message"]
    # an assistant turn may be empty (e.g. a prefill placeholder)
    ok = post(client, "plain-key", messages=[{"role": "user", "content": "hi"}, {"role": "assistant"}])
    # validated and authorized; stopped only because this app's engine is not started
    assert ok.status_code == 503, ok.text
    assert ok.json()["error"]["code"] == "engine_not_ready"


def test_startup_heap_is_frozen_out_of_the_collectors_reach():
    """Full collections while serving must not walk the startup heap (0.7 s stalls measured)."""
    import gc

    from safeserve.server.engine import freeze_startup_heap

    before = gc.get_freeze_count()
    kept = [{"startup": i} for i in range(1000)]
    freeze_startup_heap()
    try:
        assert gc.get_freeze_count() >= before + len(kept)
    finally:
        gc.unfreeze()


def test_moderations_share_the_chat_authorization_and_need_a_head(client, tmp_path):
    def moderate(key, cfg=None):
        body = {"input": "hi", **({"safety_config": cfg} if cfg is not None else {})}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return client.post("/v1/moderations", json=body, headers=headers)

    assert moderate(None).status_code == 401
    r = moderate("plain-key", {"allow": ["violence"]})
    assert r.status_code == 403 and r.json()["error"]["code"] == "safety_config_not_permitted"
    assert moderate("studio-key", {"allow": ["violence"]}).status_code == 503  # authorized
    assert moderate("plain-key").status_code == 503
    no_head = TestClient(create_app(Engine(Settings(), EngineSpec(
        model_dir=tmp_path, served_name="m", has_head=False, safety_enabled=False))))
    r = no_head.post("/v1/moderations", json={"input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "safety_unavailable"
    # Chat on that server: a request that asks for a safety config, in the body or the
    # header, is refused rather than served without it; one that asks for none is served.
    for body, headers in (({"safety_config": {"allow": []}}, {}),
                          ({}, {"X-Safety-Config": "strict"})):
        r = no_head.post("/v1/chat/completions", json={"model": "m", "messages": MSG, **body},
                         headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "safety_unavailable"
        assert r.json()["error"]["param"] == "safety_config"
    # a trace asked for has nothing to trace: refused too; "off" asks for nothing
    r = no_head.post("/v1/chat/completions", json={"model": "m", "messages": MSG},
                     headers={"X-Safety-Trace": "1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Safety-Trace", r.text
    for headers in ({}, {"X-Safety-Trace": "0"}):
        r = no_head.post("/v1/chat/completions", json={"model": "m", "messages": MSG},
                         headers=headers)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"


def test_bad_settings_and_unparsable_files_are_one_line_startup_errors(tmp_path):
    """A bad flag value, log level or YAML file stops the server with one line naming it,
    not a traceback (and before any engine starts)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("keys:\n  k1: {presets: [strict\n")
    cases = [(("--dtype", "foo"), "--dtype"), (("--port", "99999"), "--port"),
             (("--refusal-explain-sentences", "17"), "--refusal-explain-sentences"),
             (("--log-level", "loud"), "--log-level"),
             (("--grants", str(broken)), "broken.yaml"), (("--presets", str(broken)), "presets")]
    for args, named in cases:
        r = run_serve(*args)
        assert r.returncode == 1, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("safeserve: ") and named in lines[-1], (args, r.stderr)
        assert "Traceback" not in r.stderr, (args, r.stderr)


def test_the_shutdown_grace_reaches_uvicorn_and_bad_values_are_refused(monkeypatch):
    """In-flight requests get ``--shutdown-grace-s`` to finish on SIGTERM (uvicorn's graceful
    shutdown timeout, whole seconds rounded up); a negative grace is a startup error."""
    from safeserve.server.launch import load_settings, uvicorn_config

    assert uvicorn_config(None, Settings()).timeout_graceful_shutdown == 5
    monkeypatch.setenv("SAFESERVE_SHUTDOWN_GRACE_S", "120")
    assert uvicorn_config(None, load_settings()).timeout_graceful_shutdown == 120
    assert uvicorn_config(None, load_settings(shutdown_grace_s=2.5)).timeout_graceful_shutdown == 3
    r = run_serve("--shutdown-grace-s", "-1")
    assert r.returncode == 1 and "--shutdown-grace-s" in r.stderr.splitlines()[-1], r.stderr
