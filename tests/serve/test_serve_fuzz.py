"""A schema-based fuzz run: schemathesis generates requests from the published `/openapi.json`
(valid ones, and invalid ones that break the schema on purpose) and sends them to the app in
process, around the FakePipeline. Whatever arrives, the server never answers 5xx, every error is
OpenAI's envelope, and every answer matches the status codes, content types and schemas the
document publishes (RELIABILITY §3.0, P1-P19, H1-H3, H8).

Bounded in time: `MAX_EXAMPLES` cases per operation and mode (about 20 s in all on 2 CPU cores;
generating the chat requests is most of it).
Images are never fetched: the app's resolver finds no address for any host.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fake_pipeline import FakePipeline  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from vlmdeploy.serve import ServerConfig, create_app  # noqa: E402
from vlmdeploy.vl.media import MediaPolicy  # noqa: E402

MAX_EXAMPLES = 100
ENVELOPE = {"message", "type", "param", "code"}

APP = create_app(FakePipeline(session_len=512),
                 ServerConfig(max_concurrent_requests=64, max_images_per_request=4),
                 media_policy=MediaPolicy.server_default(resolver=lambda host, port: []))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=MAX_EXAMPLES, database="none")


def openai_envelope(ctx, response, case) -> None:
    """Every 4xx/5xx body is exactly OpenAI's error envelope."""
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ENVELOPE and isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, openai_envelope]


@schema.parametrize()
@settings(deadline=None, database=None, max_examples=MAX_EXAMPLES,
          suppress_health_check=list(HealthCheck))
def test_fuzz_never_5xx_and_always_the_envelope(case):
    case.call_and_validate(checks=CHECKS)
