"""Test-only helpers: the evaluation data (skipped when missing), measured figures, an OTLP trace receiver.

Starting stage servers and reading recordings live in ``services/harness.py``, shared with the benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services import harness


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data; skips the test when it is missing, fails instead when CI=true."""
    path = harness.SHARED_DATA.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is missing: the evaluation data lives in ../shared/data beside the clone"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def read_manifest(folder: str) -> list[dict[str, str]]:
    """:func:`services.harness.read_manifest`; skips the test when the folder is missing (see shared_data)."""
    shared_data("speech", folder)
    return harness.read_manifest(folder)


def report(line: str) -> None:
    """Prints a measured figure (shown with -s, and in the captured output of a failure)."""
    print(line, flush=True)  # noqa: T201 - measured figures belong in the test output


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """In-test OTLP/gRPC trace receiver: keeps (service name, trace id, span name) of every span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attrs.get("service.name", "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append((service, span.trace_id.hex(), span.name))
        return trace_service_pb2.ExportTraceServiceResponse()
