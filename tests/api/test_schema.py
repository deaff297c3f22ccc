"""A schemathesis run against the served OpenAPI schema: whatever the generated input, valid
or not, the API answers a documented status with a body matching the schema, never a 5xx.

(Driven through schemathesis' Python API rather than its pytest plugin, whose lazy fixture
loading does not run on this pytest.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from tests.profiles import examples

from .conftest import API_KEY

EXAMPLES_PER_OPERATION = examples(30)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_no_input_makes_the_api_fail(client, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 9
    if mode is GenerationMode.NEGATIVE:
        # Only an operation that takes input can be given invalid input.
        operations = [op for op in operations if list(op.iter_parameters())
                      or op.get_request_payload_content_types()]
        assert len(operations) == 6
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            # With the key, so that generated bodies reach the handler, not only the auth.
            headers = {"X-API-Key": API_KEY} if mode is GenerationMode.POSITIVE else None
            response = case.call_and_validate(headers=headers, excluded_checks=[
                # A schema-valid prompt may still be refused with 400: what the tokenizer
                # encodes and what fits the context are the model's, not the schema's.
                positive_data_acceptance])
            assert response.status_code < 500, f"{case.operation.label}: {response.text}"

        check()
