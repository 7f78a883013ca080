"""The exception a gRPC method raises crosses to Serve's proxy, which unpickles it and
so imports the module of its class: that must not pull in torch or the rest of the
router, or the proxy's event loop (every request and health check) stalls for the
import. Checked in a fresh interpreter."""

from __future__ import annotations

import pickle
import subprocess
import sys

from router.errors import ErrorKind, RouterError
from router.grpc_api import GRPC_STATUS, fail


class _Context:
    def __init__(self) -> None:
        self.code: object = None
        self.details = ""

    def set_code(self, code: object) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def test_the_raised_status_error_unpickles_without_heavy_imports() -> None:
    context = _Context()
    error = fail(context, RouterError(ErrorKind.UNAVAILABLE, "the decode instance died"))
    assert context.code is GRPC_STATUS[ErrorKind.UNAVAILABLE]
    assert context.details == "the decode instance died"
    blob = pickle.dumps(error)
    probe = (
        "import pickle, sys\n"
        f"e = pickle.loads({blob!r})\n"
        "heavy = sorted(m for m in ('torch', 'engine', 'router.core', 'router.grpc_api') "
        "if m in sys.modules)\n"
        "print(type(e).__name__, str(e), heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "GrpcStatusError the decode instance died []"
