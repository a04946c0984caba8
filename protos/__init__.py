"""The wire contract: `inference.proto` (package splitinfer.v1), its generated modules, serde, the tensor codec,
the MQTT topics and payloads, and "host:port" addresses.

- `protos.serde`: the one place proto messages and gRPC statuses turn into our types and back
  (`CloudRequest` / `CloudReply`, `request_to_proto` / `request_from_proto` / `reply_to_proto` /
  `reply_from_proto`, `status_name` / `status_code` / `status_number`).
- `protos.codec`: numpy arrays <-> encoded tensors (codec specs, compression, validation before allocation).
- `protos.mqtt`: MQTT topic names and JSON payload schemas; `protos.address`: `parse_address`.

Regenerate `protos.inference_pb2` / `protos.inference_pb2_grpc` with `python -m protos.generate` (check them with
`--check`). pb2 types stop at serde and codec: the agent and the servicer speak `CloudRequest` / `CloudReply`;
only the two stream ends (edge_agent/transport.py, cloud_tier/servicer.py) hold messages, as the stream's items.
"""

PROTO_PACKAGE = "splitinfer.v1"
PROTO_FILES = ("protos/inference.proto", "protos/local.proto")  # protos.generate builds every protos/*.proto

__all__ = ["PROTO_FILES", "PROTO_PACKAGE"]
