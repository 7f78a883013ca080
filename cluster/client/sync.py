"""The blocking client over grpc's sync channel."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client.messages import (
    Chunk,
    ClientError,
    ClusterState,
    Completion,
    Message,
    ModelCard,
    Sampling,
    build_request,
    chunk_from,
    completion_from,
    error_from,
    state_from,
)
from cluster.client.retry import RetryPolicy, StreamCalls
from protos.pdserve.v1 import SERVICE_NAME, pdserve_pb2, pdserve_pb2_grpc

# The Serve application the cluster deploys (cluster.builder.APP_NAME). Serve's gRPC
# proxy routes a call by its "application" metadata, which it needs once a Ray cluster
# runs more than one application.
APPLICATION = "pdserve"


def call_metadata(token: str | None, application: str | None) -> tuple[tuple[str, str], ...]:
    md: tuple[tuple[str, str], ...] = (("application", application),) if application else ()
    return md + ((("authorization", f"Bearer {token}"),) if token else ())


def channel_credentials(root_certificates: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


class Client:
    """Blocking client. `tls=True` (with optional `root_certificates`) for a TLS front;
    `application` is the Serve application its calls name (None: name none). A
    Generate that fails with UNAVAILABLE before its first chunk is sent again under
    `retry` (see `cluster.client.retry`), and one that breaks with UNAVAILABLE after
    some chunks is continued from what it streamed; `retries` and `resumes` count
    those calls."""

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        *,
        token: str | None = None,
        timeout_s: float = 300.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        application: str | None = APPLICATION,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._channel = (
            grpc.secure_channel(target, channel_credentials(root_certificates))
            if tls
            else grpc.insecure_channel(target)
        )
        self._stub = pdserve_pb2_grpc.PDServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._md = call_metadata(token, application)
        self.timeout_s = timeout_s
        self.retry = retry if retry is not None else RetryPolicy()
        self.retries = 0
        self.resumes = 0

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stream_request(
        self, request: pdserve_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> Iterator[Chunk]:
        calls = StreamCalls(request, self.retry, timeout_s or self.timeout_s)
        while True:
            call: Any = self._stub.Generate(
                calls.request(), timeout=calls.timeout(), metadata=self._md
            )
            try:
                for msg in call:
                    yield calls.took(chunk_from(msg))
                return
            except grpc.RpcError as e:
                kind, wait = calls.after(error_from(e))  # raises what goes to the caller
            finally:
                call.cancel()  # no-op once the call completed
            if kind == "resume":
                self.resumes += 1
            else:
                self.retries += 1
            time.sleep(wait)

    def stream(
        self,
        prompt: str | None = None,
        sampling: Sampling | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[Message] | None = None,
        client_tag: str = "",
        timeout_s: float | None = None,
    ) -> Iterator[Chunk]:
        req = build_request(
            prompt, token_ids=token_ids, messages=messages, sampling=sampling, client_tag=client_tag
        )
        return self.stream_request(req, timeout_s)

    def generate(
        self,
        prompt: str | None = None,
        sampling: Sampling | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> Completion:
        return completion_from(
            list(self.stream(prompt, sampling, token_ids=token_ids, timeout_s=timeout_s))
        )

    def chat(
        self,
        messages: Sequence[Message],
        sampling: Sampling | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Completion:
        return completion_from(
            list(self.stream(None, sampling, messages=messages, timeout_s=timeout_s))
        )

    def list_models(self, timeout_s: float = 10.0) -> list[ModelCard]:
        try:
            resp = self._stub.ListModels(
                pdserve_pb2.ListModelsRequest(), timeout=timeout_s, metadata=self._md
            )
        except grpc.RpcError as e:
            raise ClientError(e.code(), e.details() or "") from None
        return [ModelCard(m.id, m.max_model_len, m.is_default) for m in resp.models]

    def cluster_status(self, timeout_s: float = 10.0) -> ClusterState:
        try:
            resp = self._stub.ClusterStatus(
                pdserve_pb2.ClusterStatusRequest(), timeout=timeout_s, metadata=self._md
            )
        except grpc.RpcError as e:
            raise ClientError(e.code(), e.details() or "") from None
        return state_from(resp)

    def healthy(self, timeout_s: float = 5.0) -> bool:
        """The standard health service says SERVING for pdserve.v1.PDServe."""
        try:
            resp = self._health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=timeout_s,
                metadata=self._md,
            )
        except grpc.RpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
