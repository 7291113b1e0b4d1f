"""The OpenAI-compatible server, driven by the official `openai` client against a live `tailor serve --config` with
three deployments on one tiny backbone: models, chat and text completions (streamed too), the base model asked by name,
unknown users as OpenAI-shaped 404s, stale states answered and marked, sampling and stop strings; and the two pieces
under it on their own, `Backbone.generate`'s sampling and the config file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest

from tailor.backbone.model import Backbone, Sampling
from tailor.data.lamp import load_users
from tailor.methods import build_method
from tailor.serve.config import ConfigError, load_config
from tailor.store.store import Store
from tests.test_serve import NEWS, Server, free_port, items_of, wait_job

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = """
store = "store"
data_dir = "{lamp}"
default = "news"
access_log = "access.log"

[batching]
max_wait_ms = 2.0

[deployments.news]
task = "lamp2n"
method = "rag"
model = "{model}"
device = "cpu"
dtype = "float32"
options = {{ k = 1 }}

[deployments.tweets]
task = "lamp7"
method = "rag"
model = "{model}"
device = "cpu"
dtype = "float32"
options = {{ k = 1 }}

[deployments.reviews]
task = "lamp3"
method = "none"
model = "{model}"
device = "cpu"
dtype = "float32"
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, lamp_dir: Path) -> Iterator[tuple]:
    """The server of CONFIG, a tenant's key and an OpenAI client with it; alice (news) and bob (tweets) personalized."""
    root = tmp_path_factory.mktemp("openai")
    (root / "serve.toml").write_text(CONFIG.format(lamp=lamp_dir, model=tiny_model_dir))
    key = Store(root / "store").create_tenant("acme")[1]
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "TAILOR_THREADS": "1", "TAILOR_CACHE": str(root / "cache")}
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "tailor.cli", "serve", "--config", str(root / "serve.toml"),
                                    "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"server did not come up:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    alice = load_users(NEWS, "dev", lamp_dir)[0]
    api.post("/v1/users/alice/history", json={"items": items_of(alice)}).raise_for_status()
    tweets = [{"text": f"sunny day number {i} at the beach", "id": f"t{i}"} for i in range(3)]
    api.post("/v1/deployments/tweets/users/bob/history", json={"items": tweets}).raise_for_status()
    for path in ("/v1/users/alice/personalize", "/v1/deployments/tweets/users/bob/personalize"):
        assert wait_job(api, api.post(path).json())["status"] == "done"
    yield server, key, openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0), api, alice
    api.close()
    server.stop()


def test_models_are_the_deployments_on_one_backbone(served: tuple) -> None:
    server, _, client, _, _ = served
    models = {m.id: m.to_dict()["tailor"] for m in client.models.list()}
    assert set(models) == {"news", "tweets", "reviews"}
    assert models["news"]["default"] and models["news"]["base"] == "news:base" and models["news"]["native"] == "/v1"
    assert models["tweets"]["task"] == "LaMP-7" and models["tweets"]["native"] == "/v1/deployments/tweets"
    assert server.log.read_text().count("loading ") == 1  # the deployments share the backbone


def test_chat_answers_with_the_users_label_and_its_scores(served: tuple, backbone: Backbone) -> None:
    _, _, client, api, alice = served
    question = alice.queries[0].input
    reply = client.chat.completions.create(model="news", user="alice", messages=[
        {"role": "system", "content": "not read"}, {"role": "user", "content": question}])
    extension = reply.to_dict()["tailor"]
    rag = build_method("rag", NEWS, backbone, k=1)
    expected = rag.predict([(rag.personalize(alice), alice.queries[0])])[0]
    assert reply.choices[0].message.content == expected.text and reply.choices[0].finish_reason == "stop"
    assert extension["scores"] == pytest.approx(dict(zip(NEWS.labels, expected.scores)), abs=2e-3)
    assert (extension["user"], extension["personalized"], extension["stale"]) == ("alice", True, False)
    # the question's content alone is put into the task's template: the same answer as the whole question
    article = question[question.index("article:") + len("article:"):].strip()
    short = client.completions.create(model="news", user="alice", prompt=article)
    assert short.choices[0].text == expected.text
    native = api.post("/v1/predict", json={"requests": [{"user_id": "alice", "query": article}]}).json()
    assert native["predictions"][0]["text"] == expected.text


def test_unknown_users_get_openai_shaped_errors_and_the_base_model_is_asked_by_name(served: tuple) -> None:
    server, key, client, _, _ = served
    question = [{"role": "user", "content": "a football match"}]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="news", user="ghost", messages=question)
    assert unknown.value.response.json() == {"error": {
        "message": "unknown user 'ghost'", "type": "not_found_error", "param": "user", "code": "unknown_user"}}
    with pytest.raises(openai.UnprocessableEntityError, match="give `user`") as missing:
        client.chat.completions.create(model="news", messages=question)
    assert missing.value.response.json()["error"]["param"] == "user"
    with pytest.raises(openai.NotFoundError, match="model_not_found|no model"):
        client.chat.completions.create(model="nope", user="alice", messages=question)
    base = client.chat.completions.create(model="news:base", messages=question)
    assert base.choices[0].message.content and base.to_dict()["tailor"]["personalized"] is False
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=key[:-2] + "zz", max_retries=0).models.list()


def test_streaming_chat_and_completions_end_with_done(served: tuple) -> None:
    _, _, client, api, _ = served
    kwargs = dict(model="tweets", user="bob", max_tokens=8)
    messages = [{"role": "user", "content": "what a day at the beach"}]
    whole = client.chat.completions.create(messages=messages, **kwargs)
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens <= 8
    assert any("tailor" in c.to_dict() for c in chunks)
    prompts = ["what a day", "sunny beach"]
    texts = client.completions.create(prompt=prompts, **kwargs)
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(prompt=prompts, stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in texts.choices}
    with api.stream("POST", "/v1/chat/completions", json={**kwargs, "messages": messages, "stream": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_sampling_options_and_stop_strings(served: tuple) -> None:
    _, _, client, _, _ = served
    ask = dict(model="tweets", user="bob", messages=[{"role": "user", "content": "the beach"}], max_tokens=12)
    greedy = [client.chat.completions.create(**ask).choices[0].message.content for _ in range(2)]
    seeded = [client.chat.completions.create(**ask, temperature=1.5, top_p=0.9, seed=7).choices[0].message.content
              for _ in range(2)]
    assert greedy[0] == greedy[1] and seeded[0] == seeded[1]
    others = {client.chat.completions.create(**ask, temperature=1.5, seed=s).choices[0].message.content
              for s in range(6)}
    assert len(others) > 1  # the seed decides the draw
    text = greedy[0]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(**ask, stop=[stop]).choices[0].message.content
    assert stop not in cut and text.startswith(cut.strip())
    short = client.chat.completions.create(**{**ask, "max_tokens": 2})
    assert short.usage.completion_tokens <= 2 and short.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.APIStatusError, match="max_tokens"):
        client.chat.completions.create(**{**ask, "max_tokens": 100000})


def test_new_history_is_answered_from_the_previous_state_marked_stale(served: tuple) -> None:
    _, _, client, api, alice = served
    question = [{"role": "user", "content": alice.queries[0].input}]
    before = client.chat.completions.create(model="news", user="alice", messages=question)
    added = api.post("/v1/users/alice/history", json={"items": [{"text": "one more article about crime",
                                                                 "title": "x", "category": "crime", "id": "new-1"}]})
    assert added.json()["stale"]
    stale = client.chat.completions.create(model="news", user="alice", messages=question).to_dict()
    assert stale["tailor"]["stale"] and stale["tailor"]["state_items"] == stale["tailor"]["history_items"] - 1
    assert stale["choices"][0]["message"]["content"] == before.choices[0].message.content
    assert wait_job(api, api.post("/v1/users/alice/personalize").json())["status"] == "done"
    fresh = client.chat.completions.create(model="news", user="alice", messages=question).to_dict()["tailor"]
    assert not fresh["stale"] and fresh["state_items"] == fresh["history_items"]
    metrics = httpx.get(served[0].url + "/metrics").text
    assert 'tailor_stale_answers_total{deployment="news"} 1.0' in metrics


def test_ratings_outside_the_tasks_range_are_refused(served: tuple) -> None:
    _, _, _, api, _ = served
    history = "/v1/deployments/reviews/users/carol/history"
    for score in ("7", "0.5", "five", ""):
        refused = api.post(history, json={"items": [{"text": "fine", "score": "4"}, {"text": "bad", "score": score}]})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "malformed" and error["param"] == "items.1.score" and "LaMP-3 rating" in error["message"]
        assert "from 1 to 5" in error["message"]
    accepted = api.post(history, json={"items": [{"text": "fine", "score": "4"}, {"text": "meh", "score": "2.5"}]})
    assert accepted.status_code == 200 and accepted.json()["added"] == 2


def test_access_log_goes_to_the_configured_file(served: tuple) -> None:
    server, _, client, _, _ = served
    client.models.list()
    lines = (server.log.parent / "access.log").read_text().splitlines()
    assert any(line.endswith("ms") and " GET /v1/models 200 " in line for line in lines)


# --- the pieces on their own ---------------------------------------------------------------------------------------

def test_generate_is_greedy_by_default_and_samples_reproducibly(backbone: Backbone) -> None:
    prompts = ["the movie was great and", "sports news politics", "a b", "the film story of love"]
    greedy = backbone.generate(prompts, 10, 2)
    assert backbone.generate(prompts, 10, 2, sampling=Sampling()) == greedy
    assert backbone.generate(prompts, 10, 4, sampling=[Sampling(stop=())] * 4) == greedy
    drawn = [Sampling(temperature=1.0, top_p=0.95, seed=i) for i in range(4)]
    first = backbone.generate(prompts, 10, 2, sampling=drawn)
    assert backbone.generate(prompts, 10, 2, sampling=drawn) == first and first != greedy
    # a seeded row draws the same text whatever shares its batch
    assert backbone.generate(prompts[:1], 10, 1, sampling=drawn[:1]) == first[:1]
    assert backbone.generate(prompts, 10, 2, sampling=Sampling(temperature=1.0, top_p=1e-6)) == greedy
    stop = greedy[0][3:5]
    cut = backbone.generate(prompts[:1], 10, 1, sampling=Sampling(stop=(stop,)))[0]
    assert stop not in cut and greedy[0].startswith(cut)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def test_config_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    cases = {
        'store = "s"\n': "no \\[deployments.NAME\\]",
        '[deployments.a]\ntask = "lamp2n"\nmethod = "rag"\n': "`store` is missing",
        'store = "s"\n[deployments.a]\ntask = "lamp2n"\n': "\\[deployments.a\\]: `method` is missing",
        'store = "s"\n[deployments.a]\ntask = "lamp2n"\nmethod = "rag"\nk = 4\n': "unknown key k",
        'store = "s"\ndefault = "b"\n[deployments.a]\ntask = "lamp2n"\nmethod = "rag"\n': "names no deployment",
        'store = "s"\n[deployments."a:b"]\ntask = "lamp2n"\nmethod = "rag"\n': "a deployment name",
        'store = "s"\n[batching]\nmax_batch = 0\n[deployments.a]\ntask = "lamp2n"\nmethod = "rag"\n': "max_batch",
        'store = "s"\n[worker]\nthread = 2\n[deployments.a]\ntask = "lamp2n"\nmethod = "rag"\n': "unknown key thread",
        'store = \n': "serve.toml",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    path.write_text('store = "s"\n[deployments.b]\ntask = "lamp7"\nmethod = "rag"\n[deployments.a]\ntask = "lamp2n"\n'
                    'method = "none"\noptions = { batch_size = 4 }\n')
    config = load_config(path)
    assert config.store == tmp_path / "s" and config.default == "b" and config.deployments[1].options == {
        "batch_size": 4}
