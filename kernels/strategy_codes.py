"""The decoding strategy's codes: what a row is asked to do on a violation, and where it
stands. Plain integers, shared by the strategy kernel (kernels/safety_strategy.py, whose
Triton body spells them as literals), the worker and the HTTP side (server/safety_wire.py)."""

ACTION_ANNOTATE = 0
ACTION_REFUSE = 1
ACTION_STOP = 2

# Per-row phase of the decoding strategy (worker side, reported in telemetry).
PHASE_WATCH = 0  # generating freely, watching the signal
PHASE_REFUSING = 1  # forcing the refusal prefix, one token per step
PHASE_REFUSED = 2  # prefix spliced in; the model explains (see PHASE_RETRACTED)
# (3 was "stopping": a stop now forces end-of-sequence in the step that decides it)
PHASE_DONE = 4  # stopped: end-of-sequence forced at every step from here
PHASE_CLOSED = 5  # the explanation after a refusal spent its budget: end-of-sequence forced
# A bounded explanation read over a threshold: ended at once (end-of-sequence forced) and
# withheld by the HTTP side, so the refusal alone is the answer.
PHASE_RETRACTED = 6
