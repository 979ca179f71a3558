"""The other side of the contract: sign a webhook the Standard Webhooks way and deliver it.

A sender gives each message one id and keeps it for every retry; each attempt is signed again
with a fresh timestamp (a receiver rejects timestamps older than five minutes). Retries use
capped exponential backoff with jitter, on what may succeed later: connection errors,
timeouts, 5xx, 408 and 429 (honouring ``Retry-After``). A 4xx is the receiver saying "never":
it is returned at once. A 200 for a repeated id is success too — the receiver deduplicates.

Command line (writes the status and body, like curl)::

    python -m level_3_advanced.webhook.sign --url http://127.0.0.1:5000/webhook/order \\
        --secret whsec_... '{"order_id": 777, "status": "created"}'
    python -m level_3_advanced.webhook.sign --print-headers --secret whsec_... '{...}'

``--print-headers`` only signs and writes the three headers, one per line (for curl ``-H``).
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from common.config import Settings
from common.events import InvalidEventError, dumps, loads
from common.logger import configure_logging, get_logger
from common.retry import Backoff
from level_3_advanced.webhook.standard_webhooks import signed_headers

__all__ = ["DeliveryError", "SendResult", "WebhookSender", "new_message_id", "send_webhook"]

log = get_logger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_BACKOFF = Backoff(base=0.2, factor=2.0, cap=10.0, jitter=True)
MAX_RETRY_AFTER = 60.0


class DeliveryError(RuntimeError):
    """Every attempt failed; ``last_status`` is the last HTTP status (None: no answer)."""

    def __init__(self, message: str, *, attempts: int, last_status: int | None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_status = last_status


@dataclass(frozen=True)
class SendResult:
    """The receiver's final answer to one message."""

    status: int
    body: Any  # the decoded JSON body, or the text when it is not JSON
    msg_id: str
    attempts: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def new_message_id() -> str:
    """A fresh message id in the style of the spec's examples (``msg_...``)."""
    return f"msg_{uuid.uuid4().hex}"


class WebhookSender:
    """Posts signed webhooks to one URL over a keep-alive connection, with retries.

    ``secret``: one secret, or several (all sign each attempt: rotation); None sends
    unsigned requests with an ``Idempotency-Key`` header instead.
    """

    def __init__(
        self,
        url: str,
        secret: str | bytes | Iterable[str | bytes] | None = None,
        *,
        attempts: int = 5,
        timeout: float = 5.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port]/path, got {url!r}")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.secrets: list[str | bytes] | None = (
            None
            if secret is None
            else [secret]
            if isinstance(secret, (str, bytes))
            else list(secret)
        )
        self.attempts = attempts
        self.timeout = timeout
        self.backoff = backoff
        self._sleep = sleep
        self._conn: http.client.HTTPConnection | None = None

    def send(
        self,
        payload: dict[str, Any] | bytes,
        *,
        msg_id: str | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> SendResult:
        """Deliver one message; returns the final answer or raises DeliveryError."""
        body = payload if isinstance(payload, bytes) else dumps(payload)
        msg_id = msg_id or new_message_id()
        last_status: int | None = None
        reason = ""
        for attempt in range(1, self.attempts + 1):
            headers = {"Content-Type": "application/json", **(extra_headers or {})}
            if self.secrets:
                headers.update(signed_headers(self.secrets, msg_id, body).as_dict())
            else:
                headers["Idempotency-Key"] = msg_id
            retry_after: float | None = None
            try:
                status, raw, retry_after = self._post(body, headers)
            except (OSError, http.client.HTTPException) as exc:
                self.close()  # the connection's state is unknown: start a fresh one
                last_status, reason = None, f"{type(exc).__name__}: {exc}"
            else:
                last_status = status
                if status not in RETRY_STATUSES:
                    return SendResult(status, _decode(raw), msg_id, attempt)
                reason = f"HTTP {status}"
            if attempt == self.attempts:
                break
            delay = self.backoff.delay(attempt)
            if retry_after is not None:
                delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
            log.warning(
                "webhook %s attempt %d/%d failed (%s); retrying in %.2fs",
                msg_id,
                attempt,
                self.attempts,
                reason,
                delay,
            )
            self._sleep(delay)
        raise DeliveryError(
            f"webhook {msg_id} not delivered after {self.attempts} attempt(s): {reason}",
            attempts=self.attempts,
            last_status=last_status,
        )

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float | None]:
        reused = self._conn is not None
        try:
            return self._post_once(body, headers)
        except (ConnectionError, http.client.RemoteDisconnected):
            if not reused:
                raise
            # The server closed the idle keep-alive connection: one fresh try, not an attempt.
            self.close()
            return self._post_once(body, headers)

    def _post_once(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float | None]:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        conn = self._conn
        conn.request("POST", self._path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        if response.will_close:
            self.close()
        return response.status, raw, _retry_after(response.getheader("Retry-After"))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> WebhookSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _decode(raw: bytes) -> Any:
    try:
        return loads(raw)
    except InvalidEventError:
        return raw.decode(errors="replace")


def send_webhook(
    url: str,
    payload: dict[str, Any] | bytes,
    secret: str | bytes | Iterable[str | bytes] | None = None,
    *,
    msg_id: str | None = None,
    attempts: int = 5,
    timeout: float = 5.0,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> SendResult:
    """Sign and deliver one webhook (a one-shot :class:`WebhookSender`)."""
    with WebhookSender(url, secret, attempts=attempts, timeout=timeout, backoff=backoff) as s:
        return s.send(payload, msg_id=msg_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sign and send a Standard Webhooks message.")
    parser.add_argument("body", help="the JSON body, sent byte for byte as given")
    parser.add_argument("--url", default="http://127.0.0.1:5000/webhook/order")
    parser.add_argument(
        "--secret",
        action="append",
        help="signing secret (repeat to sign with several); default: $WEBHOOK_SECRET",
    )
    parser.add_argument("--id", dest="msg_id", help="message id (default: a new msg_...)")
    parser.add_argument("--timestamp", type=int, help="signing time (default: now)")
    parser.add_argument("--attempts", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument(
        "--print-headers", action="store_true", help="only sign: write the three headers"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.attempts <= 20 or not 0 < args.timeout <= 120:
        parser.error("--attempts must be 1..20 and --timeout in (0, 120]")
    configure_logging()
    secrets = args.secret or [s for s in [Settings.load().webhook_secret] if s]
    body = args.body.encode()
    msg_id = args.msg_id or new_message_id()
    out = sys.stdout  # this command's output, like curl's; diagnostics go to the log
    if args.print_headers:
        if not secrets:
            parser.error("--print-headers needs --secret or WEBHOOK_SECRET")
        signed = signed_headers(secrets, msg_id, body, timestamp=args.timestamp)
        for name, value in signed.as_dict().items():
            out.write(f"{name}: {value}\n")
        return 0
    try:
        result = send_webhook(
            args.url,
            body,
            secrets or None,
            msg_id=msg_id,
            attempts=args.attempts,
            timeout=args.timeout,
        )
    except DeliveryError as exc:
        log.error("%s", exc)
        out.write(f"{exc.last_status or 'no answer'} {exc}\n")
        return 1
    except (ValueError, socket.gaierror) as exc:
        log.error("%s", exc)
        return 2
    text = result.body if isinstance(result.body, str) else dumps(result.body).decode()
    out.write(f"{result.status} {text}\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
