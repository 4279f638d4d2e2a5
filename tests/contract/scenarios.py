"""The fleet and routing scenarios both contract tests run (8 workers: H100 and A100 prefill, Gaudi 2 and L4 decode)."""

POOLS = [
    {"name": "prefill-h100", "role": "prefill", "replicas": 2, "hardware": "h100-sxm"},
    {"name": "prefill-a100", "role": "prefill", "replicas": 1, "hardware": "a100"},
    {"name": "decode-g2", "role": "decode", "replicas": 3, "hardware": "gaudi2", "engine": {"max_batch_size": 16}},
    {"name": "decode-l4", "role": "decode", "replicas": 2, "hardware": "l4",
     "engine": {"max_batch_size": 8, "num_kv_blocks": 2000}},
]

SCENARIOS = {
    "context-ttft": dict(pools=POOLS, routing={"kind": "context-ttft"}),
    "threshold": dict(pools=POOLS, routing={"kind": "threshold", "threshold_tokens": 1500}),
    "power-capped": dict(pools=POOLS, routing={"kind": "power"},
                         power={"cluster_w": 1500, "on_no_fit": "queue", "queue_cap": 5000}),
}
