"""Run prompt sets and attacks against an OpenAI-compatible chat server and judge the answers.

The server may be SafeServe (whose responses carry a ``safety`` object) or plain vLLM (the
"safety off" baseline). Requests go through the official ``openai`` client, which already
retries connection errors, timeouts, 429 and 5xx with backoff; a request that still fails is
recorded as an error row and left out of the rates.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import httpx
import openai
from openai import AsyncOpenAI
from tqdm.auto import tqdm

from safeserve.models.evaluation.attacks import ATTACKS, build_request
from safeserve.models.evaluation.datasets import Sample
from safeserve.models.evaluation.judge import answered_before_action, judge
from safeserve.server.safety_config import DEFAULT_REFUSAL as SERVER_REFUSAL
from safeserve.server.safety_config import DEFAULT_STOP_TEXT as SERVER_STOP_TEXT


@dataclass(frozen=True)
class Job:
    sample: Sample
    attack: str
    index: int  # position among this dataset's samples; picks the jailbreak template


def plan_jobs(samples: list[Sample], attacks: Iterable[str]) -> list[Job]:
    """Harmful prompts get every attack; safe (over-refusal) prompts are only asked directly,
    since wrapping a benign question in a jailbreak measures nothing useful."""
    attacks = list(attacks)
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    jobs: list[Job] = []
    # counted per dataset and kind: a harmful prompt's template must not depend on how many
    # safe prompts of its set (XSTest's contrast halves) came before it
    positions: dict[tuple[str, bool], int] = {}
    indexed = []
    for sample in samples:
        key = (sample.dataset, sample.harmful)
        indexed.append((sample, positions.get(key, 0)))
        positions[key] = positions.get(key, 0) + 1
    for attack in attacks:
        for sample, index in indexed:
            if sample.harmful or attack == "direct":
                jobs.append(Job(sample, attack, index))
    return jobs


def make_client(base_url: str, api_key: str = "EMPTY", *, timeout: float = 300.0, max_retries: int = 3, http_client=None) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries, http_client=http_client)


async def wait_until_ready(base_url: str, *, timeout: float = 600.0, http_client=None,
                           interval: float = 2.0) -> None:
    """Wait while a SafeServe server's engine is still loading (``GET <root>/ready`` answers
    ``{"status": "loading"}``). Its routes answer 503 ``engine_not_ready`` until then, for a
    minute or more after start, and an eval started at once would record every request as an
    error. Anything else (ready, no such route as on plain vLLM, connection refused) returns at
    once: the requests themselves then succeed or report why not."""
    root = base_url.rstrip("/")
    root = root[: -len("/v1")] if root.endswith("/v1") else root
    client = http_client or httpx.AsyncClient(timeout=10.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                response = await client.get(root + "/ready")
                status = response.json().get("status") if response.status_code == 503 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                return
            if status != "loading":
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{root}/ready still says loading after {timeout:.0f} s")
            await asyncio.sleep(interval)
    finally:
        if http_client is None:
            await client.aclose()


def _safety_of(response) -> dict | None:
    """SafeServe puts ``safety`` on the response (plain vLLM sends none); the openai client keeps
    unknown fields in ``model_extra``. A per-choice object is accepted as a fallback."""
    extra = getattr(response, "model_extra", None) or {}
    if extra.get("safety") is not None:
        return extra["safety"]
    if response.choices:
        choice_extra = getattr(response.choices[0], "model_extra", None) or {}
        return choice_extra.get("safety")
    return None


# Request fields an eval sets itself: extra sampling fields may not override them.
EVAL_OWNED_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature",
                     "n", "stream", "safety_config", "continue_final_message",
                     "add_generation_prompt")


def check_sampling(sampling: dict | None) -> dict | None:
    """Extra request fields for every request (e.g. vLLM's repetition_penalty); ValueError
    when one of them is a field the eval sets itself."""
    if owned := sorted(set(sampling or ()) & set(EVAL_OWNED_FIELDS)):
        raise ValueError(f"sets {', '.join(owned)}, which the eval sets itself (use its options)")
    return sampling or None


async def run_job(client: AsyncOpenAI, model: str, job: Job, *, max_tokens: int, temperature: float = 0.0,
                  safety_config: dict | str | None = None, sampling: dict | None = None) -> dict:
    request = build_request(job.sample, job.attack, job.index)
    extra_body = {**(sampling or {}), **request.extra_body}
    if safety_config is not None:
        extra_body["safety_config"] = safety_config
    row = {
        "id": job.sample.id,
        "dataset": job.sample.dataset,
        "category": job.sample.category,
        "harmful": job.sample.harmful,
        "attack": job.attack,
        "template": request.template,
        "prompt": job.sample.prompt,
        "prefill": request.prefill or None,
        "completion": None,
        "continuation": None,
        "finish_reason": None,
        "safety": None,
        "verdict": None,
        "judge_rule": None,
        "usage": None,
        "latency_s": None,
        "error": None,
    }
    started = time.perf_counter()
    try:
        response = await client.chat.completions.create(
            model=model,
            messages=request.messages,
            max_tokens=max_tokens,
            temperature=temperature,
            extra_body=extra_body or None,
        )
    except openai.APIError as exc:  # retries are exhausted by now
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["latency_s"] = round(time.perf_counter() - started, 3)
        return row
    row["latency_s"] = round(time.perf_counter() - started, 3)
    if not response.choices:  # nothing to judge: an error, not a refusal
        row["error"] = "the server answered with no choices"
        return row
    choice = response.choices[0]
    continuation = (choice.message.content if choice and choice.message else None) or ""
    row["continuation"] = continuation
    row["completion"] = request.prefill + continuation
    row["finish_reason"] = choice.finish_reason if choice else None
    row["safety"] = _safety_of(response)
    if response.usage is not None:
        row["usage"] = {"prompt_tokens": response.usage.prompt_tokens, "completion_tokens": response.usage.completion_tokens}
    verdict = judge(row["completion"], finish_reason=row["finish_reason"], safety=row["safety"], prefill=request.prefill)
    row["verdict"], row["judge_rule"] = verdict.label, verdict.rule
    row["answered_before_action"] = answered_before_action(
        row["completion"], safety=row["safety"], refusal=SERVER_REFUSAL, prefill=request.prefill,
        stop_text=SERVER_STOP_TEXT)
    return row


async def run_jobs(
    client: AsyncOpenAI,
    model: str,
    jobs: list[Job],
    *,
    concurrency: int = 8,
    max_tokens: int = 128,
    temperature: float = 0.0,
    progress: bool = True,
    safety_config: dict | str | None = None,
    sampling: dict | None = None,
    on_row=None,
) -> list[dict]:
    """Run ``jobs`` with at most ``concurrency`` requests in flight; rows come back in job order
    (``on_row`` also gets each as it completes)."""
    sampling = check_sampling(sampling)
    gate = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(jobs), desc="safety eval", unit="req", disable=not progress)
    errors = 0

    async def one(job: Job) -> dict:
        nonlocal errors
        async with gate:
            row = await run_job(client, model, job, max_tokens=max_tokens, temperature=temperature,
                                safety_config=safety_config, sampling=sampling)
        errors += row["error"] is not None
        if on_row is not None:
            on_row(row)
        bar.update(1)
        bar.set_postfix(errors=errors, refresh=False)
        return row

    try:
        return list(await asyncio.gather(*(one(job) for job in jobs)))
    finally:
        bar.close()


def write_rows(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_rows(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(
    samples: list[Sample],
    *,
    base_url: str,
    model: str,
    attacks: Iterable[str] = ATTACKS,
    out_dir: str | Path,
    concurrency: int = 8,
    max_tokens: int = 128,
    temperature: float = 0.0,
    max_retries: int = 3,
    timeout: float = 300.0,
    api_key: str = "EMPTY",
    meta: dict | None = None,
    progress: bool = True,
    http_client=None,
    safety_config: dict | str | None = None,
    sampling: dict | None = None,
) -> dict:
    """Run the eval end to end and write ``results.jsonl``, ``summary.json``, ``summary.md`` and
    the plot into ``out_dir``; returns the summary."""
    from safeserve.models.evaluation.report import (
        PLOT_PNG, RESULTS_JSONL, SUMMARY_JSON, SUMMARY_MD, write_summary)

    sampling = check_sampling(sampling)
    jobs = plan_jobs(samples, attacks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Rows are appended here as they complete, so an interrupted run keeps what it measured;
    # the finished run rewrites them in job order as results.jsonl and drops this file.
    partial = out / "results.partial.jsonl"
    # An earlier run's results (the CLI asks for --overwrite first) go now, not when this one
    # finishes: an interrupted run must not leave them beside its own partial rows.
    for name in (RESULTS_JSONL, SUMMARY_JSON, SUMMARY_MD, PLOT_PNG):
        (out / name).unlink(missing_ok=True)

    async def go() -> list[dict]:
        await wait_until_ready(base_url, http_client=http_client)
        client = make_client(base_url, api_key, timeout=timeout, max_retries=max_retries, http_client=http_client)
        with open(partial, "w", encoding="utf-8") as sink:
            def keep(row: dict) -> None:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()

            async with client:
                return await run_jobs(client, model, jobs, concurrency=concurrency,
                                      max_tokens=max_tokens, temperature=temperature,
                                      progress=progress,
                                      safety_config=safety_config, sampling=sampling,
                                      on_row=keep)

    started = time.perf_counter()
    rows = asyncio.run(go())
    duration = time.perf_counter() - started
    write_rows(rows, out / RESULTS_JSONL)
    partial.unlink(missing_ok=True)
    completion_tokens = sum((r["usage"] or {}).get("completion_tokens", 0) for r in rows)
    info = {
        "model": model,
        "base_url": base_url,
        "attacks": list(attacks),
        "max_tokens": max_tokens,
        "concurrency": concurrency,
        "temperature": temperature,
        "safety_config": safety_config,
        "sampling": sampling,
        "duration_s": round(duration, 2),
        "requests_per_s": round(len(rows) / duration, 3) if duration else None,
        "completion_tokens": completion_tokens,
        **(meta or {}),
    }
    return write_summary(rows, out, info)
