"""``logprobs`` / ``top_logprobs`` on the real engine (OpenAI's shape), with the deterministic
test head of tests/heads.py: entries only for tokens the client receives."""

from __future__ import annotations

import json

import pytest

from safeserve.server.safety_config import DEFAULT_REFUSAL

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ANNOTATE = {"allow": ["violence", "weapons"], "on_violation": "annotate"}


def chat(http, server, **body):
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": FRANCE,
                                                "temperature": 0, "max_tokens": 12, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_one_entry_per_token_with_the_top_alternatives(oai, server):
    r = oai.chat.completions.create(model=server.model, messages=FRANCE, temperature=0,
                                    max_tokens=12, logprobs=True, top_logprobs=3,
                                    extra_body={"safety_config": ANNOTATE})
    choice = r.choices[0]
    content = choice.logprobs.content
    # every token but the end-of-sequence one, which is not text
    assert len(content) == r.usage.completion_tokens - (choice.finish_reason == "stop")
    assert "".join(e.token for e in content) == choice.message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0.0
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy, nothing forced: the sampled token is the most likely one
        assert e.token == e.top_logprobs[0].token and abs(e.logprob - tops[0]) < 1e-5
        assert bytes(e.bytes).decode("utf-8") == e.token


def test_streamed_logprobs_equal_the_unary_ones(http, server):
    unary = chat(http, server, logprobs=True, top_logprobs=2, safety_config=ANNOTATE)
    with http.stream("POST", "/v1/chat/completions", json={
            "model": server.model, "messages": FRANCE, "temperature": 0, "max_tokens": 12,
            "logprobs": True, "top_logprobs": 2, "stream": True,
            "safety_config": ANNOTATE}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    streamed = [e for ev in events for c in ev["choices"]
                for e in ((c.get("logprobs") or {}).get("content") or [])]
    want = unary["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in streamed] == [e["token"] for e in want]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(streamed, want))


def test_withheld_tokens_have_no_logprobs(http, server):
    # strict: the test head's violence score flags the prompt; the explanation is withheld
    data = chat(http, server, logprobs=True, safety_config="strict", max_tokens=24)
    choice = data["choices"][0]
    assert choice["message"]["content"] == DEFAULT_REFUSAL
    assert data["safety"]["response"]["explanation_withheld"] is True
    tokens = [e["token"] for e in choice["logprobs"]["content"]]
    assert "".join(tokens) == DEFAULT_REFUSAL  # the forced refusal's tokens, nothing after
    assert len(tokens) < data["usage"]["completion_tokens"]
    # the refusal was forced: its tokens carry the model's own (raw) log-probabilities
    assert min(e["logprob"] for e in choice["logprobs"]["content"]) < -1.0


def test_no_logprobs_unless_asked(http, server):
    assert chat(http, server, safety_config=ANNOTATE)["choices"][0].get("logprobs") is None


@pytest.mark.parametrize("body, param", [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
])
def test_bad_logprobs_requests_are_a_400(http, server, body, param):
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": FRANCE,
                                                **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_bytes_are_the_tokens_own_even_inside_a_character(http, server):
    """A token holding part of a multi-byte character decodes to U+FFFD; its `bytes` are its
    own, so a client joining them gets the character back (they were U+FFFD's UTF-8)."""
    prefill = [{"role": "user", "content": "Write the Japanese word for Japan."},
               {"role": "assistant", "content": "日"}]
    r = chat(http, server, messages=prefill, logprobs=True, max_tokens=8,
             continue_final_message=True, add_generation_prompt=False,
             safety_config=ANNOTATE)
    import codecs

    content = r["choices"][0]["logprobs"]["content"]
    raw = [bytes(e["bytes"]) for e in content]

    def whole(b: bytes) -> bool:
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(map(whole, raw)), [e["token"] for e in content]  # some split a character
    # joined, they are the text (a character cut by max_tokens at the end is in neither)
    joined = codecs.getincrementaldecoder("utf-8")().decode(b"".join(raw))
    assert joined == r["choices"][0]["message"]["content"]


def test_token_bytes_of_both_tokenizer_families(base_model_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from safeserve.server.token_bytes import token_bytes_reader

    tok = AutoTokenizer.from_pretrained(str(base_model_dir))  # byte-level BPE
    text = "héllo 日本 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    read = token_bytes_reader(tok)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens split a character
    assert b"".join(read(i) for i in ids).decode("utf-8") == text
    assert read(tok.eos_token_id) is None  # special: the text's UTF-8 is used
    # SentencePiece with byte fallback (Llama 2, Mistral): <0xAB> pieces and U+2581 spaces
    pieces = {1: "\u2581hello", 2: "<0xE6>", 3: "<0x97>"}
    sp = SimpleNamespace(backend_tokenizer=SimpleNamespace(decoder=type("Sequence", (), {})()),
                         all_special_ids=[0], convert_ids_to_tokens=pieces.get)
    read = token_bytes_reader(sp)
    assert [read(i) for i in (1, 2, 3)] == [b" hello", b"\xe6", b"\x97"] and read(0) is None
