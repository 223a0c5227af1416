"""schemathesis against the running service's own OpenAPI schema: every documented operation, with valid and
invalid (negative) inputs generated from the schema, answers within the schema and never with a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection

from tests.conftest import serve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, fast_model: Path) -> Iterator[Any]:
    with serve({"MODEL_PATH": str(fast_model)}, tmp_path_factory.mktemp("schema")) as running:
        yield schemathesis.openapi.from_url(f"{running.url}/v1/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_within_its_schema(api_schema: Any, mode: GenerationMode) -> None:
    """schemathesis's own pytest plugin does not run under pytest 9 (it sets a private node attribute), so the
    operations are driven through its Python API: one hypothesis run per operation."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/query-classify",
        "POST /v1/query-classify:batch",
    }
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not len(operation.body):
            continue  # nothing to make invalid (GET routes without parameters)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def conforms(case: Any) -> None:
            if mode is GenerationMode.POSITIVE:
                case.call_and_validate()
                return
            # Invalid input must be refused with a 4xx. schemathesis's own check does not count 413 (a body over
            # MAX_BODY_BYTES, refused before it is read) as a refusal, so that check is ours.
            response = case.call_and_validate(excluded_checks=[negative_data_rejection])
            assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])

        conforms()
