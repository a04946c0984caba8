"""The wire contract: `inference.proto` (package splitinfer.v1), its generated modules, and the tensor codec.

Import the generated modules as `protos.inference_pb2` / `protos.inference_pb2_grpc`; regenerate them with
`python -m protos.generate` (and check them with `--check`). Outside `protos/` and the two transport modules
(edge_agent's client, cloud_tier's servicer), code speaks numpy and `protos.codec`, not pb2 types.
"""

PROTO_PACKAGE = "splitinfer.v1"
PROTO_FILES = ("protos/inference.proto",)

__all__ = ["PROTO_FILES", "PROTO_PACKAGE"]
