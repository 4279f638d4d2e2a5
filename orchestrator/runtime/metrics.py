"""Prometheus metrics of a Tandem deployment (one registry per server; names follow vLLM's shapes).

Request latencies are labelled by the decode pool that served the request and how its prefill ran
(`prefill_path` = remote | local); worker gauges carry `pool`, `role` and `accelerator`. KV transfer
bytes and latency count what crossed the KV transport (gRPC or in-process). Decisions are counted
by reason exactly as core's router/admission name them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

WORKER_LABELS = ("pool", "role", "accelerator", "worker")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class TandemMetrics:
    """All metrics of one serving process, in their own registry (tests may build many)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        req = ("model_name", "pool", "prefill_path")
        self.ttft_s = Histogram("tandem:time_to_first_token_seconds", "Time to first token.", req,
                                buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl_s = Histogram("tandem:inter_token_latency_seconds", "Time between consecutive output tokens.",
                               req, buckets=ITL_BUCKETS_S, registry=r)
        self.tpot_s = Histogram("tandem:time_per_output_token_seconds",
                                "Mean time per output token after the first, per request.", req,
                                buckets=ITL_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("tandem:e2e_request_latency_seconds", "End-to-end request latency.", req,
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("tandem:prompt_tokens", "Prefill tokens processed.", req, registry=r)
        self.generation_tokens = Counter("tandem:generation_tokens", "Generated tokens.", req, registry=r)
        self.request_success = Counter("tandem:request_success", "Finished requests by finish reason.",
                                       ("model_name", "finished_reason"), registry=r)
        self.requests_rejected = Counter("tandem:requests_rejected", "Requests refused by admission (429).",
                                         ("model_name", "reason"), registry=r)
        self.route_decisions = Counter("tandem:route_decisions", "Routing decisions by reason.",
                                       ("model_name", "reason"), registry=r)
        self.admission_decisions = Counter("tandem:admission_decisions", "Admission decisions by outcome.",
                                           ("model_name", "outcome", "reason"), registry=r)
        self.requests_running = Gauge("tandem:num_requests_running", "Requests decoding on a worker.",
                                      WORKER_LABELS, registry=r)
        self.requests_waiting = Gauge("tandem:num_requests_waiting", "Requests queued at a worker.",
                                      WORKER_LABELS, registry=r)
        self.frontend_inflight = Gauge("tandem:frontend_requests_in_flight", "Requests admitted by the frontend.",
                                       ("model_name",), registry=r)
        self.kv_usage = Gauge("tandem:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", WORKER_LABELS,
                              registry=r)
        self.kv_free_blocks = Gauge("tandem:kv_cache_free_blocks", "Free KV blocks.", WORKER_LABELS, registry=r)
        self.power_w = Gauge("tandem:power_watts", "Power draw per worker (meter or static model).",
                             (*WORKER_LABELS, "source"), registry=r)
        self.kv_transfer_bytes = Counter("tandem:kv_transfer_bytes", "KV bytes received over the KV transport.",
                                         ("src_pool", "dst_pool", "transport"), registry=r)
        self.kv_transfer_s = Histogram("tandem:kv_transfer_latency_seconds",
                                       "KV transfer time per request, measured by the receiver: first frame to last layer "
                                       "written (overlaps the prefill, which streams layer by layer).",
                                       ("src_pool", "dst_pool", "transport"), buckets=LATENCY_BUCKETS_S, registry=r)
        self.worker_up = Gauge("tandem:worker_up", "1 when the worker answered its last health check.",
                               WORKER_LABELS, registry=r)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
