"""The cloud tier's typed, validated server configuration and its gRPC channel options."""

from __future__ import annotations

import os
from dataclasses import dataclass

from protos.codec import DEFAULT_MAX_TENSOR_BYTES

MIB = 1024 * 1024
HEALTH_SERVICE = "splitinfer.v1.SplitInference"

# Keepalive pairing with the edge agent: agents ping every 20 s (keepalive_time_ms=20000, also without an
# active call); the server accepts pings as often as every 10 s, so they never earn a GOAWAY too_many_pings.
# The server pings idle clients every 60 s itself and drops a connection unanswered after 20 s.
MIN_CLIENT_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one cloud node; `validate()` names the bad field."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks; the server reports the port it got
    max_batch: int = 16  # rows (sum of request batch dims) per tail run
    max_wait_ms: float = 0.0  # > 0: the first request of a batch waits this long for company (0: continuous)
    max_queue: int = 256  # requests waiting per (model, cut); beyond: RESOURCE_EXHAUSTED
    workers: int = max(1, min(4, os.cpu_count() or 1))  # tail runs in parallel (thread pool size)
    intra_op_threads: int = 1  # onnxruntime threads per run; workers * this should not exceed the cores
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES  # decompressed size limit per tensor
    max_message_bytes: int = 64 * MIB  # gRPC receive/send limit (the default 4 MiB is too small)
    max_inflight_per_stream: int = 64  # requests of one stream being worked on; beyond: stop reading it
    prefer_gpu: bool = True  # CUDA execution provider first when onnxruntime has it

    def validate(self) -> "ServerConfig":
        """Return self, or raise ValueError naming the field and what was expected."""
        positive = ("max_batch", "max_queue", "workers", "intra_op_threads", "max_tensor_bytes",
                    "max_message_bytes", "max_inflight_per_stream")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be in 0..65535, got {self.port}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"ServerConfig.max_wait_ms must be >= 0, got {self.max_wait_ms}")
        return self

    def grpc_options(self) -> list[tuple[str, int]]:
        """gRPC server options, each set deliberately (see the keepalive note above)."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ]
