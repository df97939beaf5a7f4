"""Health probes for Docker and Kubernetes: ask Cog's /health-check and judge its `status`.

Cog 0.23.1 answers /health-check with HTTP 200 in every state, UNHEALTHY included: after its
worker process dies (the OOM killer, a crash) the server stays up, reports UNHEALTHY and fails
or refuses every prediction. A probe that looks only at the HTTP code (Kubernetes httpGet,
`curl -f`) passes on such a server for ever, so this one reads the body.

    python -m cogvideox_cog.health live    # 0 while STARTING, READY or BUSY; else 1
    python -m cogvideox_cog.health ready   # 0 only when READY: a prediction would start now

It imports nothing heavy (no torch): a probe runs every few seconds next to the model.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.request

# STARTING covers setup(), which downloads the weights on a first start (minutes): liveness
# passes, and a stalled download fails setup by itself (docs/operations.md, Kubernetes).
ALIVE = frozenset({"STARTING", "READY", "BUSY"})
# One prediction at a time: a BUSY server answers 409 to the next one.
ACCEPTING = frozenset({"READY"})
CHECKS = {"live": ALIVE, "ready": ACCEPTING}
# Cog gives its worker 10 s to answer the health check it forwards to it; wait a bit longer.
TIMEOUT_S = 12.0
# Asked directly, never through an HTTP_PROXY the deployment sets for its downloads: a proxy
# cannot reach this container's loopback, and the probe would fail a healthy server.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def default_url() -> str:
    """Cog's port, as Cog reads PORT: its int() drops surrounding blanks, such as the carriage
    return an env file with Windows line ends can leave, which in the URL failed a healthy
    server."""
    return f"http://127.0.0.1:{os.environ.get('PORT', '5000').strip()}/health-check"


def server_status(url: str, timeout: float = TIMEOUT_S) -> str:
    """The `status` Cog reports, or UNREACHABLE when it does not answer with one."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            body = json.load(response)
    # Refused, timed out, an HTTP error, not HTTP at all (another service on the port), not
    # JSON.
    except (OSError, ValueError, http.client.HTTPException):
        return "UNREACHABLE"
    return str(body.get("status", "UNREACHABLE")) if isinstance(body, dict) else "UNREACHABLE"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cogvideox_cog.health", description=__doc__)
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--url", default=default_url(), help="default: 127.0.0.1:$PORT")
    args = parser.parse_args(argv)
    status = server_status(args.url)
    healthy = status in CHECKS[args.check]
    print(f"{args.check}: {status} -> {'ok' if healthy else 'failing'}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
