"""dqnfleet.v1 gRPC messages and stubs, generated from protos/ (see generate.py)."""

from . import fleet_pb2, fleet_pb2_grpc

__all__ = ["fleet_pb2", "fleet_pb2_grpc"]
