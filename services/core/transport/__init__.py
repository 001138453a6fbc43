"""How services reach each other and show themselves: gRPC servers, health and
readiness, channels and backoff (rpc.py), listen address, TLS and token
(security.py), each role's typed status (status.py), Prometheus metrics
(metrics.py), TensorBoard summaries sent to the trainer (summaries.py), a
cross-thread wake-up for coroutines (broadcast.py), logging and signals
(runtime.py), and what produced a run (run_record.py). Imports settings and
api only.
"""
