"""The webhook receiver: ``POST /webhook/order`` verifies, records durably, answers 202, and
workers handle the event afterwards — the pattern of GitHub, Stripe and LiqPay webhooks.

One request, in order:

1. size: a body over ``MAX_CONTENT_LENGTH`` -> 413 (before anything is parsed);
2. signature, when a secret is configured: Standard Webhooks headers over the raw body -> 401
   with the reason (missing header, stale timestamp, no matching signature);
3. content type ``application/json`` -> 415; parseable JSON object -> 400;
   ``order_id`` a positive integer and ``status`` one of created/paid/shipped/cancelled -> 400
   naming the field (unknown extra fields are ignored: senders add fields over time);
4. idempotency: a repeated ``webhook-id`` (or ``Idempotency-Key``) -> 200 with the original
   event id, nothing emitted; the same key with another payload -> 422;
5. the ``order.<status>`` event is appended to ``accepted.log`` and fsync'd (group commit)
   -> 202 ``{"event_id": ...}``; only then is it handed to the bus, whose workers react.
   Too many events accepted and not yet handled, or a failed disk -> 503 with
   ``Retry-After`` (nothing was accepted).

Every error is a JSON body ``{"error": "..."}``. ``GET /health`` reports the queue depth,
``GET /metrics`` the counts (accepted, rejected by reason, duplicates, handled, failed).

Threads (the bus workers) start in the process that serves, on :meth:`WebhookService.start`
or the first request — never at import or in :func:`create_app` — because a pre-forking
server would otherwise fork a process without them, and events would get a 202 but never be
handled. Run it: ``python -m level_3_advanced.webhook.webhook_server --server waitress``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections import Counter, deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Request, Response, request
from werkzeug.exceptions import HTTPException

from common.config import Settings
from common.events import Event, InvalidEventError, dumps, loads
from common.logger import configure_logging, get_logger
from common.storage import atomic_write
from level_3_advanced.webhook.eventbus_webhook import OrderProjection, WebhookBus, build_bus
from level_3_advanced.webhook.standard_webhooks import (
    DEFAULT_TOLERANCE,
    SignatureError,
    Verifier,
    check_message_id,
    parse_secrets,
)
from level_3_advanced.webhook.store import (
    KEY_FIELD,
    SYNC_MODES,
    HandledRecord,
    IdempotencyConflict,
    StorageError,
    WebhookStore,
)

__all__ = ["STATUSES", "ServerThread", "WebhookService", "create_app", "main", "run_server"]

log = get_logger(__name__)

STATUSES = ("created", "paid", "shipped", "cancelled")
MAX_ORDER_ID = 2**63 - 1
DEFAULTS: dict[str, Any] = {
    "MAX_CONTENT_LENGTH": 64 * 1024,
    "WEBHOOK_TOLERANCE": DEFAULT_TOLERANCE,
    "WEBHOOK_SYNC": "group",
    "WEBHOOK_WORKERS": 2,
    "WEBHOOK_QUEUE_MAXSIZE": 10_000,
    "WEBHOOK_EMAIL_DELAY": 0.0,
    "WEBHOOK_IDEMPOTENCY_LIMIT": 1_000_000,
}


class Rejected(Exception):
    """A request refused with a 4xx/5xx: status, the reason counted in metrics, the message."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}


def json_response(body: Any, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return Response(dumps(body), status, headers=headers, mimetype="application/json")


def validate_order(body: bytes) -> dict[str, Any]:
    """The order fields of a JSON body, or Rejected(400) naming what is wrong."""
    try:
        payload = loads(body)
    except InvalidEventError as exc:
        raise Rejected(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise Rejected(400, "invalid_json", "body must be a JSON object")
    if "order_id" not in payload:
        raise Rejected(400, "invalid_field", "'order_id' is required")
    order_id = payload["order_id"]
    if type(order_id) is not int or not 0 < order_id <= MAX_ORDER_ID:
        raise Rejected(
            400, "invalid_field", f"'order_id' must be a positive integer, got {_show(order_id)}"
        )
    if "status" not in payload:
        raise Rejected(400, "invalid_field", "'status' is required")
    status = payload["status"]
    if not isinstance(status, str) or status not in STATUSES:
        raise Rejected(
            400,
            "invalid_field",
            f"'status' must be one of {', '.join(STATUSES)}, got {_show(status)}",
        )
    return {"order_id": order_id, "status": status}


def _show(value: Any) -> str:
    text = dumps(value).decode() if value is not None else "null"
    return text if len(text) <= 40 else text[:37] + "..."


class Metrics:
    """Thread-safe counters for ``/metrics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "accepted": self.counts["accepted"],
                "duplicates": self.counts["duplicates"],
                "rejected": dict(self.rejected),
                "rejected_total": sum(self.rejected.values()),
                "handled": self.counts["handled"],
                "failed": self.counts["failed"],
                "recovered": self.counts["recovered"],
            }


class WebhookService:
    """Everything behind the routes: verifier, store, bus, metrics. Built by create_app."""

    def __init__(self, config: Mapping[str, Any], *, bus: WebhookBus | None = None) -> None:
        self.data_dir = Path(config["WEBHOOK_DATA_DIR"])
        secrets = parse_secrets(config.get("WEBHOOK_SECRET") or None)
        self.verifier = (
            Verifier(secrets, tolerance=float(config["WEBHOOK_TOLERANCE"])) if secrets else None
        )
        self.sync = str(config["WEBHOOK_SYNC"])
        if self.sync not in SYNC_MODES:
            raise ValueError(f"WEBHOOK_SYNC must be one of {SYNC_MODES}, got {self.sync!r}")
        self.workers = int(config["WEBHOOK_WORKERS"])
        self.email_delay = float(config["WEBHOOK_EMAIL_DELAY"])
        self.idempotency_limit = int(config["WEBHOOK_IDEMPOTENCY_LIMIT"])
        if bus is not None and not isinstance(bus, WebhookBus):
            raise TypeError("bus must be a WebhookBus (see eventbus_webhook.build_bus)")
        self._given_bus = bus
        self.bus: WebhookBus | None = bus
        self.queue_maxsize = (int(getattr(bus, "maxsize", 0)) if bus is not None else 0) or int(
            config["WEBHOOK_QUEUE_MAXSIZE"]
        )
        self.store: WebhookStore | None = None
        self.metrics = Metrics()
        self.projection = OrderProjection()
        self._backlog: deque[Event] = deque()  # durable, refused by a full queue: retried
        self._handover_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._pid: int | None = None
        self._closing = False

    # -- life cycle -------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._pid == os.getpid() and not self._closing

    def start(self) -> WebhookService:
        """Open the record, recover what was accepted but not handled, start the workers.

        Called by ``main()`` before serving, or by the first request. Idempotent within a
        process; raises RuntimeError in a process forked after it ran (create the app in the
        serving process instead).
        """
        if self._pid == os.getpid():
            return self
        with self._start_lock:
            if self._pid == os.getpid():
                return self
            if self._pid is not None:
                raise RuntimeError(
                    "the webhook service was started in another process before a fork; "
                    "create and start the app in the process that serves"
                )
            if self._closing:
                raise StorageError("the webhook service is closed")
            if self.verifier is None:
                log.warning("WEBHOOK_SECRET is not set: signatures are NOT verified")
            if self.bus is None:
                self.bus = build_bus(
                    workers=self.workers,
                    maxsize=self.queue_maxsize,
                    email_delay=self.email_delay,
                )
            self.bus.on_handled = self._on_handled
            store = WebhookStore(
                self.data_dir,
                sync=self.sync,
                idempotency_limit=self.idempotency_limit,
                on_durable=self._hand_over,
                on_records=self._apply,
            )
            pending, handled = store.open()
            for record in handled:
                self.projection.apply(record)
            self.store = store
            self._pid = os.getpid()
            self.bus.start()
            if pending:
                self.metrics.count("recovered", len(pending))
                with self._handover_lock:  # as many as the queue takes; the rest as it drains
                    self._backlog.extend(pending)
                    self._drain_locked()
            log.info(
                "webhook service ready: data %s, sync=%s, %d worker(s), %d recovered",
                self.data_dir,
                self.sync,
                self.workers,
                len(pending),
            )
        return self

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting, let the workers finish what they can, close the record.

        Events still queued after ``timeout`` stay unhandled on disk: the next start handles
        them.
        """
        self._closing = True
        bus = self.bus
        if bus is not None:
            if bus is self._given_bus:
                bus.join(timeout)
            else:
                bus.close(timeout)
        if self.store is not None:
            self.store.close()

    # -- the webhook ------------------------------------------------------------------------
    def receive(self, req: Request) -> Response:
        """Handle ``POST /webhook/order``; see the module docstring for the order of checks."""
        try:
            self.start()
            if self._closing:
                raise Rejected(503, "unavailable", "shutting down", {"Retry-After": "1"})
            body = req.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
            key = self._check_signature(req, body)
            if not req.is_json:
                raise Rejected(
                    415,
                    "unsupported_media_type",
                    f"Content-Type must be application/json, got {req.mimetype or 'none'!r}",
                )
            charset = req.mimetype_params.get("charset", "utf-8").lower()
            if charset not in ("utf-8", "utf8"):
                raise Rejected(415, "unsupported_media_type", "JSON must be UTF-8")
            data = validate_order(body)
            if key is not None:
                data[KEY_FIELD] = key
            event = Event(
                f"order.{data['status']}", data, correlation_id=f"order-{data['order_id']}"
            )
            return self._accept(event)
        except Rejected as exc:
            self.metrics.reject(exc.reason)
            return json_response({"error": exc.message}, exc.status, exc.headers)

    def _check_signature(self, req: Request, body: bytes) -> str | None:
        """The idempotency key (the verified webhook-id, else Idempotency-Key), if any."""
        if self.verifier is not None:
            try:
                return self.verifier.verify(req.headers, body)
            except SignatureError as exc:
                raise Rejected(401, "bad_signature", str(exc)) from None
        key = req.headers.get("webhook-id") or req.headers.get("Idempotency-Key")
        if key is None:
            return None
        try:
            return check_message_id(key)
        except ValueError as exc:
            raise Rejected(400, "invalid_key", f"invalid idempotency key: {exc}") from None

    def _accept(self, event: Event) -> Response:
        store, bus = self.store, self.bus
        assert store is not None and bus is not None
        # Backpressure on everything accepted and not yet handled (queued, in a worker, in the
        # backlog): a dict's length, so the hot path takes no lock the workers contend for.
        if store.unhandled >= self.queue_maxsize:
            raise Rejected(503, "queue_full", "too many events waiting", {"Retry-After": "1"})
        try:
            outcome = store.accept(event)
        except IdempotencyConflict as exc:
            raise Rejected(422, "idempotency_conflict", str(exc)) from None
        except StorageError as exc:
            log.error("cannot record %s: %s", event.id, exc)
            raise Rejected(
                503, "storage", "the event could not be stored", {"Retry-After": "5"}
            ) from None
        if outcome.created:
            self.metrics.count("accepted")
            return json_response({"event_id": outcome.event_id}, 202)
        self.metrics.count("duplicates")
        return json_response({"event_id": outcome.event_id, "duplicate": True}, 200)

    # -- after the 202 ----------------------------------------------------------------------
    def _hand_over(self, events: list[Event]) -> None:
        """Give durable events to the bus, in order; a full queue keeps them in the backlog."""
        with self._handover_lock:
            if self._backlog:  # older events wait: keep the order
                self._backlog.extend(events)
                self._drain_locked()
                return
            bus = self.bus
            assert bus is not None
            for i, event in enumerate(events):
                try:
                    bus.publish(event)
                except Exception as exc:  # QueueFullError, or a closed bus while shutting down
                    log.warning("bus refused %s (%s); kept for later", event.id, exc)
                    self._backlog.extend(events[i:])
                    return

    def _drain_locked(self) -> None:
        bus = self.bus
        assert bus is not None
        backlog = self._backlog
        while backlog and bus.qsize() < self.queue_maxsize:
            try:
                bus.publish(backlog[0])
            except Exception as exc:  # QueueFullError, or a closed bus while shutting down
                log.warning("bus refused %s (%s); kept for later", backlog[0].id, exc)
                return
            backlog.popleft()

    def _on_handled(self, event: Event, failed: bool, effects: list[dict[str, Any]]) -> None:
        """Worker thread: record the handled marker with the effects (written in batches)."""
        store = self.store
        if store is None:
            return
        error = self._dead_letter_reason(event) if failed else None
        try:
            store.mark_handled(event, failed=failed, effects=effects, error=error)
        except StorageError as exc:
            log.error(
                "handled %s but could not record it (%s): handled again on restart", event.id, exc
            )
        if self._backlog:
            with self._handover_lock:
                self._drain_locked()

    def _apply(self, records: list[HandledRecord]) -> None:
        """Flusher thread: the records are on disk, so their effects take place now."""
        failures = 0
        for record in records:
            self.projection.apply(record)
            failures += record.failed
        self.metrics.count("handled", len(records) - failures)
        if failures:
            self.metrics.count("failed", failures)

    def _dead_letter_reason(self, event: Event) -> str:
        letters = [
            str(letter)
            for letter in list(getattr(self.bus, "dead_letters", ()))
            if letter.event.id == event.id
        ]
        return "; ".join(letters) or "a listener failed"

    # -- inspection -------------------------------------------------------------------------
    def health(self) -> tuple[dict[str, Any], int]:
        if not self.started and not self._closing:
            # A health check may be the first request a WSGI server's worker sees: start
            # (recovery included) before saying "ok", and say why not if it cannot.
            try:
                self.start()
            except Exception as exc:
                return {"status": f"not started: {type(exc).__name__}: {exc}"}, 503
        store, bus = self.store, self.bus
        body: dict[str, Any] = {
            "status": "ok",
            "queue_depth": bus.qsize() if bus is not None else 0,
            "backlog": len(self._backlog),
            "unhandled": store.unhandled if store is not None else 0,
            "signatures": self.verifier is not None,
        }
        if self._closing:
            body["status"] = "shutting down"
            return body, 503
        if store is not None and store.broken is not None:
            body["status"] = "storage failed"
            body["error"] = str(store.broken)
            return body, 503
        return body, 200

    def metrics_snapshot(self) -> dict[str, Any]:
        body = self.metrics.snapshot()
        health, _ = self.health()
        body["queue_depth"] = health["queue_depth"]
        body["unhandled"] = health["unhandled"]
        body["orders"] = self.projection.snapshot()
        store = self.store
        if store is not None and store.batches:
            body["group_commit"] = {
                "commits": store.batches,
                "events": store.batched,
                "events_per_commit": round(store.batched / store.batches, 2),
            }
        return body


def _config_from(config: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = dict(DEFAULTS)
    given = dict(config or {})
    if "WEBHOOK_DATA_DIR" not in given or "WEBHOOK_SECRET" not in given:
        settings = Settings.load()
        merged["WEBHOOK_DATA_DIR"] = str(settings.data_dir / "webhook")
        merged["WEBHOOK_SECRET"] = settings.webhook_secret
    merged.update(given)
    return merged


def create_app(config: Mapping[str, Any] | None = None, *, bus: WebhookBus | None = None) -> Flask:
    """The Flask app. ``config`` overrides :data:`DEFAULTS` and the settings
    (``WEBHOOK_DATA_DIR``, ``WEBHOOK_SECRET``: one secret, or several separated by spaces).

    Nothing is opened or started here: the service starts in the serving process (first
    request, or ``app.extensions["webhook"].start()``). ``bus``: a WebhookBus to use instead
    of the default one (its listeners are the caller's).
    """
    app = Flask(__name__)
    app.config.update(_config_from(config))
    service = WebhookService(app.config, bus=bus)
    app.extensions["webhook"] = service

    @app.post("/webhook/order")
    def webhook_order() -> Response:
        return service.receive(request)

    @app.get("/health")
    def health() -> Response:
        body, status = service.health()
        return json_response(body, status)

    @app.get("/metrics")
    def metrics() -> Response:
        return json_response(service.metrics_snapshot(), 200)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        message = exc.description
        if exc.code == 413:
            service.metrics.reject("too_large")
            message = f"body larger than {app.config['MAX_CONTENT_LENGTH']} bytes"
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return json_response({"error": message}, exc.code or 500, headers)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        if isinstance(exc, StorageError):
            log.error("webhook service unavailable: %s", exc)
            return json_response({"error": str(exc)}, 503, {"Retry-After": "5"})
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_response({"error": "internal error"}, 500)

    return app


# -- serving ---------------------------------------------------------------------------------
class ServerThread:
    """The app on Werkzeug's threaded server in a background thread (demos and tests)."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0) -> None:
        from werkzeug.serving import make_server

        self._server = make_server(host, port, app, threaded=True)
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-http", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_server(
    app: Flask,
    *,
    host: str,
    port: int,
    server: str = "waitress",
    threads: int = 16,
    port_file: Path | None = None,
) -> int:
    """Start the service (recovery first), serve until SIGINT/SIGTERM, close; an exit code."""
    service: WebhookService = app.extensions["webhook"]
    try:
        service.start()
    except (StorageError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        serve(app, host=host, port=port, server=server, threads=threads, port_file=port_file)
    except KeyboardInterrupt:
        pass
    finally:
        service.close()
        log.info("stopped")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def serve(
    app: Flask, *, host: str, port: int, server: str, threads: int, port_file: Path | None = None
) -> None:
    """Serve until SIGINT/SIGTERM with the development server or waitress."""
    signal.signal(signal.SIGTERM, _interrupt)
    if server == "waitress":
        from waitress import create_server

        # waitress warns "Task queue depth is N" for every request that waits for a thread:
        # under load that is a log line per request (and its cost). /health reports load.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)

        # waitress reads a whole body before the app runs: cap it near our own limit, so a
        # huge body is refused early, while a merely too large one still gets our JSON 413.
        body_cap = max(1 << 20, 16 * int(app.config["MAX_CONTENT_LENGTH"]))
        wsgi = create_server(
            app,
            host=host,
            port=port,
            threads=threads,
            ident="eda-webhook",
            max_request_body_size=body_cap,
        )
        bound = int(wsgi.effective_port)  # type: ignore[union-attr]
        _announce(host, bound, server, port_file)
        try:
            wsgi.run()
        finally:
            wsgi.close()
    else:
        from werkzeug.serving import make_server

        dev = make_server(host, port, app, threaded=True)
        _announce(host, dev.server_port, server, port_file)
        try:
            dev.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            dev.server_close()


def _announce(host: str, port: int, server: str, port_file: Path | None) -> None:
    if port_file is not None:
        atomic_write(port_file, f"{port}\n".encode())
    log.info("listening on http://%s:%d/webhook/order (server=%s)", host, port, server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the webhook receiver.")
    parser.add_argument("--host", default="127.0.0.1", help="address (default %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    parser.add_argument("--server", choices=("dev", "waitress"), default="waitress")
    parser.add_argument("--threads", type=int, default=16, help="waitress request threads")
    parser.add_argument("--data-dir", type=Path, help="default: $EDA_DATA_DIR/webhook")
    parser.add_argument("--secret", help="signing secret(s); default: $WEBHOOK_SECRET")
    parser.add_argument("--sync", choices=SYNC_MODES, default="group")
    parser.add_argument("--workers", type=int, default=2, help="bus worker threads")
    parser.add_argument(
        "--email-delay", type=float, default=0.0, help="seconds per email (simulated SMTP)"
    )
    parser.add_argument("--port-file", type=Path, help="write the bound port here when ready")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    if not 1 <= args.threads <= 256 or not 1 <= args.workers <= 64:
        parser.error("--threads must be 1..256 and --workers 1..64")
    if not 0 <= args.email_delay <= 10:
        parser.error("--email-delay must be 0..10 seconds")
    configure_logging()

    config: dict[str, Any] = {
        "WEBHOOK_SYNC": args.sync,
        "WEBHOOK_WORKERS": args.workers,
        "WEBHOOK_EMAIL_DELAY": args.email_delay,
    }
    if args.data_dir is not None:
        config["WEBHOOK_DATA_DIR"] = str(args.data_dir)
    if args.secret is not None:
        config["WEBHOOK_SECRET"] = args.secret
    return run_server(
        create_app(config),
        host=args.host,
        port=args.port,
        server=args.server,
        threads=args.threads,
        port_file=args.port_file,
    )


if __name__ == "__main__":
    raise SystemExit(main())
