"""OpenAI-compatible HTTP through Ray Serve's proxy: the moe-serve application on the session's local Ray
cluster, called with a real HTTP client (httpx)."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.sampling_params import SamplingParams
from tests.serve.conftest import MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_WAITING, engine_stats, idle, wait_until


@pytest.fixture(scope="module")
def reference(serve_app):
    """The in-process engine on the served model: what every response must equal."""
    return LLMEngine(EngineConfig(model=str(serve_app.model_dir), max_model_len=MAX_MODEL_LEN))


def events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent-event stream, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def stream(client: httpx.Client, path: str, body: dict) -> list[str]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return events(response)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error
    return error


def test_models_lists_the_served_model_and_404s_others(client, serve_app):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [serve_app.model]
    assert client.get(f"/v1/models/{serve_app.model}").json()["max_model_len"] == MAX_MODEL_LEN
    error = error_of(client.get("/v1/models/gpt-4"), 404)
    assert "gpt-4" in error["message"] and error["code"] == "model_not_found"
    error = error_of(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404)
    assert "gpt-4" in error["message"]


def test_completion_matches_the_engine_with_usage(client, serve_app, reference):
    body = {"model": serve_app.model, "prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    want = reference.generate(["def add(a, b):"], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert result["object"] == "text_completion" and result["model"] == serve_app.model
    assert [c["text"] for c in result["choices"]] == [want.text]
    assert result["choices"][0]["finish_reason"] == want.finish_reason
    prompt_tokens = len(reference.tokenize("def add(a, b):"))
    assert result["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(want.token_ids),
                               "total_tokens": prompt_tokens + len(want.token_ids)}


def test_penalties_and_logit_bias_reach_the_engine(client, reference):
    body = {"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0, "frequency_penalty": 1.5,
            "presence_penalty": 0.5, "repetition_penalty": 1.2, "logit_bias": {"7": 2.5, "200": -100}}
    result = client.post("/v1/completions", json=body)
    assert result.status_code == 200, result.text
    want = reference.generate(["def add(a, b):"], SamplingParams(
        max_tokens=12, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.2,
        logit_bias=((7, 2.5), (200, -100.0))))[0]
    plain = reference.generate(["def add(a, b):"], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert result.json()["choices"][0]["text"] == want.text != plain.text
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                                     "logit_bias": {"42": 100}, "stop_token_ids": [42], "min_tokens": 2})
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]  # 42 was held back for two tokens, then ended the request
    assert choice["finish_reason"] == "stop" and chat.json()["usage"]["completion_tokens"] == 3


def test_tokenize_and_detokenize(client, serve_app, reference):
    body = client.post("/tokenize", json={"prompt": "def add(a, b):"}).json()
    ids = reference.tokenize("def add(a, b):")
    assert body == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids}
    assert client.post("/detokenize", json={"model": serve_app.model, "tokens": ids}).json() == {
        "prompt": reference.tokenizer.decode(ids)}
    messages = [{"role": "user", "content": "hi"}]
    chat = client.post("/tokenize", json={"messages": messages}).json()
    usage = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == len(chat["tokens"]) == usage["prompt_tokens"]
    bare = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"] and chat["tokens"][:bare["count"]] == bare["tokens"]
    for path, bad, words in (("/tokenize", {"prompt": "x", "messages": messages}, "exactly one of prompt and messages"),
                             ("/tokenize", {}, "exactly one of prompt and messages"),
                             ("/detokenize", {"tokens": [1, 10**9]}, "out of range"),
                             ("/detokenize", {"tokens": ["a"]}, "tokens")):
        assert words in error_of(client.post(path, json=bad), 400)["message"]
    assert error_of(client.post("/tokenize", json={"model": "gpt-4", "prompt": "x"}), 404)["code"] == "model_not_found"


def test_streamed_completion_equals_the_whole_one(client):
    body = {"prompt": [5, 6, 7], "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    whole = client.post("/v1/completions", json=body).json()
    payloads = stream(client, "/v1/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == "length" and set(finals[:-1]) <= {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 10


def test_seeded_sampling_is_reproducible_and_n_gives_n_choices(client):
    body = {"prompt": "x = ", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7, "n": 3,
            "ignore_eos": True}
    first, again = (client.post("/v1/completions", json=body).json() for _ in range(2))
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert first["usage"]["completion_tokens"] == 3 * 8


def test_stop_string_ends_the_completion_before_it(client, reference):
    full = reference.generate([[5, 6, 7]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].text
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].strip())
    body = {"prompt": [5, 6, 7], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full[:full.index(stop)]


def test_chat_uses_the_template_and_streams_the_same_text(client, serve_app, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    body = {"model": serve_app.model, "messages": messages, "max_tokens": 10, "temperature": 0,
            "ignore_eos": True}
    result = client.post("/v1/chat/completions", json=body).json()
    assert result["object"] == "chat.completion"
    message = result["choices"][0]["message"]
    assert message["role"] == "assistant"
    template = reference.tokenizer.chat_template
    assert "im_start" in template  # the tiny models ship a ChatML template
    prompt = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    want = reference.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert message["content"] == want.text
    assert result["usage"]["prompt_tokens"] == len(reference.tokenize(prompt))
    payloads = stream(client, "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias token ids out of range"),
    ({"prompt": "x", "stop_token_ids": [99999999]}, "stop_token_ids token ids out of range"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "x", "max_tokens": 5, "min_tokens": 6}, "min_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "max_tokenz": 3}, "max_tokenz"),
    ({"prompt": [], "max_tokens": 3}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": [1, 10**9]}, "out of range"),
    ({"prompt": [-1]}, "out of range"),
])
def test_bad_parameters_are_400_naming_the_problem(client, body, field):
    error = error_of(client.post("/v1/completions", json=body), 400)
    assert field in error["message"] or field == error.get("param"), error
    assert error["type"] == "invalid_request_error"


def test_malformed_bodies_and_routes(client):
    error = error_of(client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "JSON" in error["message"] or "json" in error["message"]
    error_of(client.post("/v1/chat/completions", json={"messages": []}), 400)
    error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    error_of(client.get("/v1/nothing-here"), 404)
    error_of(client.get("/v1/completions"), 405)
    error_of(client.post("/v1/completions", content=b"x" * (5 << 20)), 413)


def test_completion_logprobs_are_the_engines_and_stream_the_same(client, reference):
    body = {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    want = reference.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                                          logprobs=2))[0]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 8
    assert lp["token_logprobs"] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy = argmax
               for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]
    chunks = [json.loads(p) for p in stream(client, "/v1/completions", body)[:-1]]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert sum((s["token_logprobs"] for s in streamed), []) == lp["token_logprobs"]
    assert sum((s["text_offset"] for s in streamed), []) == lp["text_offset"]


def test_echo_with_logprobs_scores_the_prompt_as_the_engine_does(client, reference):
    prompt = "def add(a, b):"
    ids = reference.tokenize(prompt)
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logprobs": 2, "echo": True}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    want = reference.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2,
                                                       prompt_logprobs=2))[0]
    assert choice["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx([x.logprob for x in want.prompt_logprobs], abs=1e-5)
    assert lp["token_logprobs"][len(ids):] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-5)
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
    chunks = [json.loads(p) for p in stream(client, "/v1/completions", body)[:-1]]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert sum((s["token_logprobs"] for s in streamed), []) == lp["token_logprobs"]
    assert sum((s["tokens"] for s in streamed), []) == lp["tokens"]


def test_chat_logprobs_with_alternatives(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 3}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"] and len(content) == 6
    for t in content:
        assert len(t["top_logprobs"]) == 3 and t["top_logprobs"][0]["logprob"] == pytest.approx(t["logprob"])
        assert bytes(t["bytes"]).decode() == t["token"]
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["message"] == choice["message"]
    error = error_of(client.post("/v1/chat/completions", json={**body, "logprobs": False}), 400)
    assert "top_logprobs requires logprobs" in error["message"]


def test_prompt_longer_than_the_context_is_400(client):
    error = error_of(client.post("/v1/completions", json={"prompt": [5] * (MAX_MODEL_LEN + 1)}), 400)
    assert error["code"] == "context_length_exceeded" and str(MAX_MODEL_LEN) in error["message"]
    error = error_of(client.post("/v1/completions", json={"prompt": [5] * 10, "max_tokens": MAX_MODEL_LEN}), 400)
    assert error["code"] == "context_length_exceeded"
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_concurrent_clients_all_complete(client, serve_app):
    count = MAX_NUM_SEQS + MAX_WAITING // 2  # more than run at once, fewer than would overflow the queue
    results: list[httpx.Response | BaseException] = [None] * count  # type: ignore[list-item]

    def one(i: int) -> None:
        try:
            with httpx.Client(base_url=serve_app.url, timeout=120.0) as c:
                results[i] = c.post("/v1/completions", json={"prompt": [3 + i, 4], "max_tokens": 16,
                                                             "temperature": 0, "ignore_eos": True})
        except BaseException as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results
    assert all(r.json()["usage"]["completion_tokens"] == 16 for r in results)
    assert wait_until(lambda: idle(client))


def test_disconnecting_client_frees_its_slot(client, serve_app):
    before = engine_stats(client)["metrics"].get("finished/abort", 0)
    body = {"prompt": "a", "max_tokens": MAX_MODEL_LEN - 8, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=serve_app.url, timeout=60.0) as other:
        with other.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())
    assert wait_until(lambda: engine_stats(client)["metrics"].get("finished/abort", 0) == before + 1)
    assert wait_until(lambda: idle(client))
    assert engine_stats(client)["kv_cache_usage"] == 0.0
    assert client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2}).status_code == 200


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
def short(body: dict) -> dict:
    """Keep generations short: a missing, null or large integer max_tokens becomes 4."""
    value = body.get("max_tokens")
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 4):
        return {**body, "max_tokens": 4}
    return body


FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop",
          "stream", "echo", "ignore_eos", "logprobs", "stream_options", "user"]
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6).map(short)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=BODIES)
def test_fuzzed_bodies_get_a_success_or_a_4xx(client, path, body):
    with client.stream("POST", path, json=body) as response:
        raw = response.read()
    assert response.status_code < 500, (body, raw)
    if response.status_code == 200 and not body.get("stream"):
        assert json.loads(raw)["choices"]
    elif response.status_code == 200:
        assert raw.rstrip().endswith(b"data: [DONE]")
    else:
        assert json.loads(raw)["error"]["message"]
