"""The published API description: `/openapi.json` and `/docs` with the real request and response
schemas, real responses that match them, and `HEAD /health` answered like `GET` (load balancers
probe with it; RELIABILITY L5's health contract)."""

from __future__ import annotations

import jsonschema
import pytest
from fake_pipeline import FakePipeline
from fastapi.testclient import TestClient
from serve_helpers import chat, make_client

from vlmdeploy.serve import create_app

URL = "/v1/chat/completions"


@pytest.fixture
def doc(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def conforms(doc: dict, name: str, instance: object) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)


def test_the_schema_describes_every_route(doc):
    ops = {path: sorted(methods) for path, methods in doc["paths"].items()}
    assert ops == {"/v1/models": ["get"], "/v1/models/{model}": ["get"],
                   "/v1/chat/completions": ["post"], "/v1/completions": ["post"],
                   "/health": ["get"], "/metrics": ["get"]}
    chat_op = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat_op["operationId"] == "createChatCompletion"
    body = chat_op["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    ok = chat_op["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}
    for status in ("400", "413", "429", "503", "default"):
        error = chat_op["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}


def test_request_schemas_are_the_validating_models(doc):
    schemas = doc["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]
    fields = {"messages", "max_tokens", "n", "stream", "stop", "min_tokens"}
    assert fields <= set(request["properties"])
    assert request["properties"]["n"]["maximum"] == 16
    assert "messages" in request["required"]
    message = request["properties"]["messages"]["items"]
    assert message["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant",
                                                     "tool"]
    completion = schemas["CompletionRequest"]
    assert "prompt" in completion["required"] and completion["properties"]["max_tokens"]


def test_docs_page_is_served(client):
    response = client.get("/docs")
    assert response.status_code == 200 and "/openapi.json" in response.text


def test_real_responses_match_the_published_schemas(client, doc):
    conforms(doc, "ModelList", client.get("/v1/models").json())
    conforms(doc, "ModelCard", client.get("/v1/models/fake-model").json())
    for body in (chat(), chat(n=2, logprobs=True, top_logprobs=2, return_token_ids=True)):
        conforms(doc, "ChatCompletion", client.post(URL, json=body).json())
    for body in ({"prompt": "hi"}, {"prompt": ["a", "b"], "logprobs": 2, "return_token_ids": True}):
        conforms(doc, "Completion", client.post("/v1/completions", json=body).json())


@pytest.mark.parametrize("method,path,kwargs,status", [
    ("POST", URL, {"json": chat(n=0)}, 400),
    ("POST", URL, {"content": b"{", "headers": {"content-type": "application/json"}}, 400),
    ("POST", URL, {"json": chat(model="nope")}, 404),
    ("GET", "/nope", {}, 404),
    ("GET", URL, {}, 405),
    ("POST", URL, {"content": b"x", "headers": {"content-type": "text/plain"}}, 415),
])
def test_errors_match_the_published_envelope(client, doc, method, path, kwargs, status):
    response = client.request(method, path, **kwargs)
    assert response.status_code == status
    conforms(doc, "ErrorResponse", response.json())


def test_head_health_answers_like_get():
    fake = FakePipeline()
    client = TestClient(create_app(fake))
    response = client.head("/health")
    assert response.status_code == 200 and response.content == b""
    fake.dead = True
    assert client.head("/health").status_code == 503
    assert client.get("/health").status_code == 503


def test_head_health_needs_no_key(fake):
    keyed = make_client(fake, api_keys=("sk-one",))
    assert keyed.head("/health").status_code == 200
    assert keyed.head("/v1/models").status_code == 401
