"""The generated gRPC code is in step with protos/."""

import subprocess
import sys


def test_generated_code_is_fresh():
  result = subprocess.run(
    [sys.executable, "-m", "dqnfleet.core.api.generate", "--check"], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr


def test_generated_code_imports_and_has_the_v1_services():
  from dqnfleet.core.api import fleet_pb2, fleet_pb2_grpc

  assert fleet_pb2.DESCRIPTOR.package == "dqnfleet.v1"
  assert set(fleet_pb2.DESCRIPTOR.services_by_name) == {
    "PolicyService",
    "StatusService",
    "SummaryService",
  }
  assert hasattr(fleet_pb2_grpc, "PolicyServiceStub")
  assert hasattr(fleet_pb2_grpc, "SummaryServiceStub")
