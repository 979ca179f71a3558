"""The Standard Webhooks signature scheme, both sides: sign a message, verify a request.

The contract (https://www.standardwebhooks.com, the scheme Svix, Supabase, Resend and others
share) in three headers:

* ``webhook-id`` — the message id; the same for every retry of one message (receivers
  deduplicate on it);
* ``webhook-timestamp`` — integer seconds since the epoch when this attempt was signed;
* ``webhook-signature`` — a space-separated list of ``v1,<base64 HMAC-SHA256>``, each over the
  bytes ``id.timestamp.body``. Several signatures let a sender sign with the old and the new
  secret while a secret is being rotated; one match is enough. Other versions (``v1a`` for
  asymmetric signatures) are skipped.

Secrets are written ``whsec_<base64>``: the part after the prefix is base64-decoded to get the
key, as the spec says. A secret without the prefix is taken as its UTF-8 bytes (a passphrase
in ``.env`` during development). A receiver may hold several secrets (rotation on its side).

Verification works on the raw body bytes (never on re-serialised JSON: one changed space
breaks the signature), compares in constant time, and rejects a timestamp more than five
minutes away from now in either direction, which bounds how long a captured request can be
replayed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from secrets import token_bytes

__all__ = [
    "DEFAULT_TOLERANCE",
    "SECRET_PREFIX",
    "SignatureError",
    "SignedHeaders",
    "Verifier",
    "check_message_id",
    "decode_secret",
    "new_secret",
    "parse_secrets",
    "sign",
    "signed_headers",
]

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300  # seconds, either side of now (the spec's five minutes)
MAX_SIGNATURES = 16  # candidates looked at per request: bounds the work an attacker can cause
MAX_ID_LENGTH = 255
_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_ID_LENGTH}}}")  # printable ASCII, no spaces
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")


class SignatureError(ValueError):
    """A request whose signature cannot be trusted; the message says why (sent back in a 401)."""


def decode_secret(secret: str | bytes) -> bytes:
    """The HMAC key of a secret: ``whsec_<base64>`` is decoded, anything else is its bytes."""
    if isinstance(secret, bytes):
        key = secret
    elif secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("a webhook secret may not be empty")
    return key


def parse_secrets(value: str | bytes | Iterable[str | bytes] | None) -> tuple[bytes, ...]:
    """Keys from a setting: one secret, several separated by spaces or commas, or a list.

    An empty or missing value means "no secret configured" (signatures are not checked).
    """
    if value is None:
        return ()
    if isinstance(value, bytes):
        return (decode_secret(value),)
    items = re.split(r"[\s,]+", value.strip()) if isinstance(value, str) else list(value)
    return tuple(decode_secret(item) for item in items if item)


def new_secret(nbytes: int = 32) -> str:
    """A fresh random secret in the ``whsec_<base64>`` form."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(nbytes)).decode()


def _digest(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> bytes:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
    mac.update(body)
    return mac.digest()


def sign(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one message attempt."""
    digest = _digest(decode_secret(secret), msg_id, int(timestamp), body)
    return "v1," + base64.b64encode(digest).decode()


@dataclass(frozen=True)
class SignedHeaders:
    """The three headers of a signed attempt, ready to send."""

    msg_id: str
    timestamp: int
    signature: str

    def as_dict(self) -> dict[str, str]:
        return {
            "webhook-id": self.msg_id,
            "webhook-timestamp": str(self.timestamp),
            "webhook-signature": self.signature,
        }


def signed_headers(
    secrets: str | bytes | Iterable[str | bytes],
    msg_id: str,
    body: bytes,
    *,
    timestamp: int | None = None,
) -> SignedHeaders:
    """Sign ``body`` with one secret, or with each of several (rotation: old and new)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    keys = [secrets] if isinstance(secrets, (str, bytes)) else list(secrets)
    if not keys:
        raise ValueError("signed_headers needs at least one secret")
    return SignedHeaders(msg_id, ts, " ".join(sign(k, msg_id, ts, body) for k in keys))


def check_message_id(msg_id: str) -> str:
    """The id itself, or ValueError: 1-255 printable ASCII characters, no spaces."""
    if not _ID_RE.fullmatch(msg_id):
        raise ValueError(
            f"a message id must be 1-{MAX_ID_LENGTH} printable ASCII characters without spaces"
        )
    return msg_id


class Verifier:
    """Checks the Standard Webhooks headers of a request against one or more secrets.

    ``verify`` returns the message id, or raises :class:`SignatureError` with the reason.
    ``clock`` returns the current time in seconds (tests pass a fixed one).
    """

    def __init__(
        self,
        secrets: str | bytes | Iterable[str | bytes],
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = parse_secrets(secrets)
        if not self.keys:
            raise ValueError("a Verifier needs at least one secret")
        if tolerance < 0:
            raise ValueError("tolerance must be >= 0 seconds")
        self.tolerance = tolerance
        self._clock = clock

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """Check the three headers and the raw ``body``; return the webhook id."""
        msg_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signature = headers.get("webhook-signature")
        missing = [
            name
            for name, value in (
                ("webhook-id", msg_id),
                ("webhook-timestamp", timestamp),
                ("webhook-signature", signature),
            )
            if not value
        ]
        if missing:
            raise SignatureError(f"missing signature header(s): {', '.join(missing)}")
        assert msg_id is not None and timestamp is not None and signature is not None
        try:
            check_message_id(msg_id)
        except ValueError as exc:
            raise SignatureError(f"invalid webhook-id: {exc}") from None
        if not _TIMESTAMP_RE.fullmatch(timestamp):
            raise SignatureError("invalid webhook-timestamp: expected integer seconds since epoch")
        now = self._clock()
        ts = int(timestamp)
        if ts < now - self.tolerance:
            raise SignatureError(
                f"webhook-timestamp too old ({now - ts:.0f}s ago; tolerance {self.tolerance:.0f}s)"
            )
        if ts > now + self.tolerance:
            raise SignatureError(
                f"webhook-timestamp too new ({ts - now:.0f}s ahead; "
                f"tolerance {self.tolerance:.0f}s)"
            )
        candidates = _v1_signatures(signature)
        if not candidates:
            raise SignatureError("webhook-signature holds no v1 signature")
        for key in self.keys:
            expected = _digest(key, msg_id, timestamp, body)
            # Every candidate is compared (no early exit on the first mismatch), each in
            # constant time.
            if any(hmac.compare_digest(expected, candidate) for candidate in candidates):
                return msg_id
        raise SignatureError("no matching signature (wrong secret, or the body was changed)")


def _v1_signatures(header: str) -> list[bytes]:
    found: list[bytes] = []
    for item in header.split(" ")[: MAX_SIGNATURES * 2]:
        version, sep, value = item.partition(",")
        if not sep or version != "v1":
            continue
        try:
            found.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue  # a malformed candidate cannot match; others may
        if len(found) >= MAX_SIGNATURES:
            break
    return found
