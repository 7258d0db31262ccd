"""Export spans and log records to kms-collector with the OpenTelemetry Python SDK.

Used by collector/tests/python_exporter.rs:

    export_spans.py --protocol grpc|http --endpoint URL --count N --name SPAN_NAME [--attr-bytes B]

Makes N spans named SPAN_NAME (each with a child span, so N*2 in all) and N
log records, flushes them through the real OTLP exporter, and exits non-zero
if the exporter reports a failure. `--attr-bytes` gives each span an
attribute of that many bytes (to send large requests).

Headers (a bearer token) and TLS come from the standard variables the SDK
reads itself: OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_CERTIFICATE; an
https:// endpoint uses TLS.
"""

import argparse
import logging
import sys

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor


class CountingExporter:
    """Wraps an exporter and remembers whether any export failed."""

    def __init__(self, inner):
        self.inner = inner
        self.failed = 0

    def export(self, spans):
        result = self.inner.export(spans)
        if result != SpanExportResult.SUCCESS:
            self.failed += 1
        return result

    def shutdown(self):
        return self.inner.shutdown()

    def force_flush(self, timeout_millis=30000):
        return True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["grpc", "http"], required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--name", default="py.span")
    parser.add_argument("--attr-bytes", type=int, default=0)
    args = parser.parse_args()

    if args.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        insecure = not args.endpoint.startswith("https://")
        spans = OTLPSpanExporter(endpoint=args.endpoint, insecure=insecure)
        logs = OTLPLogExporter(endpoint=args.endpoint, insecure=insecure)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

        spans = OTLPSpanExporter(endpoint=args.endpoint.rstrip("/") + "/v1/traces")
        logs = OTLPLogExporter(endpoint=args.endpoint.rstrip("/") + "/v1/logs")

    resource = Resource.create({"service.name": "python-test"})
    exporter = CountingExporter(spans)
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=512))
    tracer = tracer_provider.get_tracer("python-test")

    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(logs))
    logger = logging.getLogger("python-test")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(LoggingHandler(level=logging.INFO, logger_provider=logger_provider))

    padding = "x" * args.attr_bytes
    for i in range(args.count):
        attributes = {"i": i, "padding": padding} if padding else {"i": i}
        with tracer.start_as_current_span(args.name, attributes=attributes):
            with tracer.start_as_current_span(args.name + ".child"):
                logger.warning("python record %d", i, extra={"event.name": args.name + ".log"})

    ok = tracer_provider.force_flush(30000) and logger_provider.force_flush(30000)
    tracer_provider.shutdown()
    logger_provider.shutdown()
    if not ok or exporter.failed:
        print(f"export failed: flush ok={ok}, failed batches={exporter.failed}", file=sys.stderr)
        return 1
    print(f"exported {args.count * 2} spans and {args.count} log records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
