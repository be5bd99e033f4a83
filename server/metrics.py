"""Prometheus metrics of the service (exposed at /metrics with vLLM's own ``vllm:*`` metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Up to 10 minutes: long generations on a CPU under load take minutes, and a top bucket below
# them would cap every quantile there.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Scores are probabilities whose thresholds sit near 1 (the default head's: 0.94-0.99998), so
# the buckets get finer toward 1: evenly spaced tenths would put a harmless 0.95 and a flagged
# 0.9999 in one bucket.
_SCORE_BUCKETS = (0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995,
                  0.9999, 0.99999, 1.0)

# Counted once per request when its response is done, with the status it got. ``stream``:
# "stream" / "unary", or "invalid" when the request was refused before its body was accepted
# (validation, authentication, size). A stream that fails after its 200 was sent counts as
# "200" here and in STREAM_ERRORS.
REQUESTS = Counter("safeserve_requests", "Chat completion requests by HTTP status and mode",
                   ["status", "stream"])
API_REQUESTS = Counter("safeserve_api_requests",
                       "Requests to the other API routes (/v1/moderations, /v1/models, "
                       "/v1/models/{id}) by path "
                       "and HTTP status", ["path", "status"])
STREAM_ERRORS = Counter("safeserve_stream_errors",
                        "Streams ended by an error event after their 200 was sent", ["type"])
FINISHED = Counter("safeserve_finished_choices", "Finished choices by finish reason", ["reason"])
TTFT = Histogram("safeserve_time_to_first_token_seconds", "Time to first token",
                 buckets=_LATENCY_BUCKETS)
ITL = Histogram("safeserve_inter_token_latency_seconds", "Time between output tokens",
                buckets=_ITL_BUCKETS)
E2E = Histogram("safeserve_e2e_request_latency_seconds",
                "End-to-end latency of completed requests (none aborted or failed)",
                buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("safeserve_prompt_tokens", "Prompt tokens processed")
GENERATION_TOKENS = Counter("safeserve_generation_tokens", "Tokens generated")
RUNNING = Gauge("safeserve_running_requests", "Requests running in the engine")
WAITING = Gauge("safeserve_waiting_requests", "Requests waiting in the engine's queue")
IN_FLIGHT = Gauge("safeserve_in_flight_requests", "Requests the HTTP layer is serving")
ABORTED = Counter("safeserve_aborted_requests",
                  "Requests stopped before the engine finished them: the client went away, or "
                  "the request failed (each request once)")

# Safety signal
SAFETY_PROMPTS_FLAGGED = Counter("safeserve_safety_prompts_flagged",
                                 "Prompts whose verdict was unsafe", ["category", "action"])
# The topic gate's share of them (a request about a category its allow-list leaves out):
# how often allow-listed traffic is refused for what it is about rather than for harm.
SAFETY_PROMPTS_GATED = Counter("safeserve_safety_prompts_gated",
                               "Prompts the topic gate flagged, by category", ["category"])
SAFETY_RESPONSES_FLAGGED = Counter("safeserve_safety_responses_flagged",
                                   "Responses flagged during generation", ["category", "action"])
SAFETY_PROMPT_SCORE = Histogram("safeserve_safety_prompt_score",
                                "Prompt-verdict score per category", ["category"],
                                buckets=_SCORE_BUCKETS)
SAFETY_RESPONSE_MAX_SCORE = Histogram("safeserve_safety_response_max_score",
                                      "Highest per-token score in a response per category",
                                      ["category"], buckets=_SCORE_BUCKETS)
SAFETY_REFUSAL_ENDINGS = Counter(
    "safeserve_safety_refusal_endings",
    "How refused responses ended: explanation_limit (its sentence or token budget), withheld "
    "(the bounded explanation read over a threshold: cut and withheld), stopped (an unbounded "
    "explanation violated for tau steps), model_end (the model ended it), max_tokens, abort",
    ["ending"])
MODERATION_INPUTS = Counter("safeserve_moderation_inputs",
                            "Inputs judged by /v1/moderations, by verdict", ["flagged"])
SAFETY_STEP_SECONDS = Counter("safeserve_safety_step_seconds",
                              "Host seconds the engine spent in the safety path (head + decision); on "
                              "CUDA the kernels run asynchronously and this is their launch time")
SAFETY_STEPS = Counter("safeserve_safety_steps", "Engine steps that ran the safety path")
HEAD_CHECK_ERROR = Gauge("safeserve_head_check_max_logit_error",
                         "Largest difference, in logits, between the head's recorded scores "
                         "(prompt verdicts and greedy answers' tokens) and this server's at "
                         "startup (the self-check)")
HEAD_CHECK_ERROR.set(float("nan"))  # until a check has measured it (never: off or no record)
