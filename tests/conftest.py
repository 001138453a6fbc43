"""Fixtures the tests share; plain helpers are in support.py."""

import shutil

from dqnfleet.core.transport import runtime

runtime.prepare_tensorflow()  # tests that build networks in-process run the services' kernels

import pytest

from support import Service, render_variants, required


@pytest.fixture
def services(tmp_path):
  """Starts services; stops whatever is still running at the end of the test."""
  started: list[Service] = []

  def start(name: str, *args: str, env: dict | None = None) -> Service:
    service = Service(name, list(args), tmp_path, env)
    started.append(service)
    return service

  yield start
  for service in reversed(started):
    if service.proc.poll() is None:
      service.proc.kill()
      service.proc.wait()


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, tuple[list[dict], str]]:
  """Each Kubernetes variant's objects and kustomize's warnings (support.render_variants),
  rendered once for every test module that checks them."""
  if not shutil.which("kubectl"):
    required("kubectl (to render deploy/k8s)")
  return render_variants(tmp_path_factory.mktemp("overlays"))
