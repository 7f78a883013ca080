"""The generated stubs: current, generated on import in a fresh tree, and working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protos import build
from protos.pdserve.v1 import REFLECTION_SERVICE_NAMES, SERVICE_NAME, pdserve_pb2, pdserve_pb2_grpc

PROTOS_DIR = Path(build.__file__).resolve().parent


def test_stubs_on_disk_are_current() -> None:
    """Regenerating from the .proto gives byte-identical files (run `python -m protos.build`
    if this fails)."""
    assert build.diff() == []
    assert not build.is_stale()


def test_stubs_use_package_imports() -> None:
    grpc_src = (PROTOS_DIR / "pdserve/v1/pdserve_pb2_grpc.py").read_text()
    assert "from protos.pdserve.v1 import pdserve_pb2 " in grpc_src
    assert "from pdserve.v1" not in grpc_src
    assert pdserve_pb2.GenerateRequest.__module__ == "protos.pdserve.v1.pdserve_pb2"


def _copy_sources(dest: Path) -> Path:
    """A fresh checkout of `protos/`: sources only, no generated stubs."""
    root = dest / "protos"
    shutil.copytree(
        PROTOS_DIR,
        root,
        ignore=shutil.ignore_patterns("*_pb2*.py", "*_pb2*.pyi", "__pycache__"),
    )
    return root


_IMPORT = (
    "from protos.pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc, SERVICE_NAME\n"
    "print(SERVICE_NAME, sorted(f.name for f in pdserve_pb2.ListModelsRequest.DESCRIPTOR.fields))"
)


def _import_in(cwd: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen(
        [sys.executable, "-c", _IMPORT],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_fresh_tree_generates_stubs_on_import(tmp_path: Path) -> None:
    """Three processes import a tree without stubs at once; all succeed and the
    stubs match a direct build. Editing the .proto regenerates them on next import."""
    root = _copy_sources(tmp_path)
    v1 = root / "pdserve" / "v1"
    assert not list(v1.glob("*_pb2*"))

    procs = [_import_in(tmp_path) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == "pdserve.v1.PDServe []"
    generated = sorted(p.name for p in v1.iterdir() if "_pb2" in p.name)
    assert generated == ["pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py"]
    for name in generated:
        assert (v1 / name).read_bytes() == (PROTOS_DIR / "pdserve/v1" / name).read_bytes()
    assert not [p for p in v1.iterdir() if p.name.endswith(".tmp")]

    proto = v1 / "pdserve.proto"
    proto.write_text(
        proto.read_text().replace(
            "message ListModelsRequest {}", "message ListModelsRequest { string filter = 1; }"
        )
    )
    future = time.time() + 5
    os.utime(proto, (future, future))
    proc = _import_in(tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "pdserve.v1.PDServe ['filter']"


def test_build_check_cli_flags_stale_stubs(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = [sys.executable, "-m", "protos.build"]
    assert subprocess.run(run, cwd=tmp_path, env=env, timeout=60).returncode == 0
    ok = subprocess.run([*run, "--check"], cwd=tmp_path, env=env, timeout=60)
    assert ok.returncode == 0
    grpc_stub = root / "pdserve" / "v1" / "pdserve_pb2_grpc.py"
    grpc_stub.write_text(grpc_stub.read_text() + "# edited\n")
    stale = subprocess.run(
        [*run, "--check"], cwd=tmp_path, env=env, timeout=60, capture_output=True, text=True
    )
    assert stale.returncode == 1
    assert "pdserve_pb2_grpc.py" in stale.stderr


def test_request_contract() -> None:
    """Clients choose exactly one input and can set no internal id (a resume carries
    only what a broken stream gave the client: its tokens and their text's length)."""
    fields = {f.name for f in pdserve_pb2.GenerateRequest.DESCRIPTOR.fields}
    assert fields == {"model", "prompt", "token_ids", "chat", "sampling", "client_tag", "resume"}
    resume = {f.name for f in pdserve_pb2.Resume.DESCRIPTOR.fields}
    assert resume == {"token_ids", "text_chars"}
    oneof = pdserve_pb2.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"]
    assert {f.name for f in oneof.fields} == {"prompt", "token_ids", "chat"}

    req = pdserve_pb2.GenerateRequest(prompt="hi")
    req.token_ids.ids.extend([1, 2, 3])
    assert req.WhichOneof("input") == "token_ids"
    assert not req.prompt

    params = pdserve_pb2.SamplingParams(max_tokens=8)
    assert params.HasField("max_tokens")
    assert not params.HasField("temperature")  # unset → server default, distinct from 0


class _ToyServicer(pdserve_pb2_grpc.PDServeServicer):
    """Answers from canned values, only to exercise the generated stubs over a socket."""

    def Generate(
        self, request: pdserve_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pdserve_pb2.GenerateResponse]:
        ids = list(request.token_ids.ids)
        yield pdserve_pb2.GenerateResponse(request_id="req-1", token_ids=ids[:1], text="a")
        yield pdserve_pb2.GenerateResponse(
            request_id="req-1",
            token_ids=ids[1:],
            text="b",
            finish_reason=pdserve_pb2.FINISH_REASON_STOP,
            stop_token_id=ids[-1],
            usage=pdserve_pb2.Usage(prompt_tokens=len(ids), completion_tokens=2),
            timings=pdserve_pb2.Timings(ttft_ms=1.5, mean_tpot_ms=0.5),
        )

    def ListModels(
        self, request: pdserve_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> pdserve_pb2.ListModelsResponse:
        return pdserve_pb2.ListModelsResponse(
            models=[pdserve_pb2.ModelInfo(id="m", max_model_len=2048, is_default=True)]
        )

    def ClusterStatus(
        self, request: pdserve_pb2.ClusterStatusRequest, context: grpc.ServicerContext
    ) -> pdserve_pb2.ClusterStatusResponse:
        inst = pdserve_pb2.InstanceStatus(
            instance_id="d0",
            pool="decode",
            role=pdserve_pb2.POOL_ROLE_DECODE,
            load=pdserve_pb2.InstanceLoad(running_seqs=3, free_kv_blocks=10),
        )
        pool = pdserve_pb2.PoolStatus(
            name="decode", role=pdserve_pb2.POOL_ROLE_DECODE, replicas=1, instances=[inst]
        )
        return pdserve_pb2.ClusterStatusResponse(cluster="c", pools=[pool])


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pdserve_pb2_grpc.add_PDServeServicer_to_server(_ToyServicer(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(REFLECTION_SERVICE_NAMES, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
        grpc.channel_ready_future(chan).result(timeout=5)
        yield chan
    server.stop(grace=None).wait(timeout=5)


def test_stubs_round_trip_with_health_and_reflection(channel: grpc.Channel) -> None:
    stub = pdserve_pb2_grpc.PDServeStub(channel)
    req = pdserve_pb2.GenerateRequest(token_ids=pdserve_pb2.TokenIds(ids=[5, 6, 7]))
    msgs = list(stub.Generate(req, timeout=5))
    assert [m.text for m in msgs] == ["a", "b"]
    assert msgs[0].finish_reason == pdserve_pb2.FINISH_REASON_UNSPECIFIED
    assert not msgs[0].HasField("usage")
    last = msgs[-1]
    assert last.finish_reason == pdserve_pb2.FINISH_REASON_STOP
    assert last.WhichOneof("stop_reason") == "stop_token_id"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 2)
    assert last.timings.ttft_ms == pytest.approx(1.5)

    models = stub.ListModels(pdserve_pb2.ListModelsRequest(), timeout=5)
    assert [m.id for m in models.models] == ["m"]
    status = stub.ClusterStatus(pdserve_pb2.ClusterStatusRequest(), timeout=5)
    assert status.pools[0].instances[0].load.free_kv_blocks == 10

    check = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
    )
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert services == {"pdserve.v1.PDServe", health.SERVICE_NAME, reflection.SERVICE_NAME}
