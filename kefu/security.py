"""Secrets and identities: signed expiring tokens, the visitor ``user_hash``, safe compares.

Tokens
------
A visitor (``POST /v1/chat/create``) or an agent session gets a token made by
:class:`TokenSigner`::

    v1.<payload>.<signature>

``payload`` is the base64url (no padding) of the msgpack of :class:`TokenClaims`;
``signature`` is the base64url (no padding) of ``HMAC-SHA256(key, "v1." + payload)``. The
``key`` is not the configured secret itself but ``HMAC-SHA256(secret, "kefu token signing
v1")``: the identity secret also signs ``user_hash = HMAC(secret, user_id)`` and the host site
hands such hashes to visitors, so without this separation a visitor who chose
``user_id = "v1.<payload>"`` would receive a valid signature for a token of their making.

:meth:`TokenSigner.verify` checks, in this order, and stops at the first failure with a
:class:`TokenError` whose ``reason`` says which:

1. length (at most :data:`MAX_SIGNED_TOKEN_CHARS`), ASCII, three dot-separated parts of the
   base64url alphabet, version ``v1`` -> ``"malformed"`` (no cryptographic work is done on
   anything larger);
2. the signature, compared in constant time with the current key and every previous one
   (key rotation) -> ``"bad_signature"``. The *encoded* signatures are compared, so there is
   exactly one accepted spelling of each token (base64 padding bits cannot be flipped);
3. the payload decodes to :class:`TokenClaims` -> ``"malformed"`` (only possible for a token
   signed by us with another layout);
4. the kind (``visitor`` / ``agent``) is the one asked for -> ``"wrong_kind"``;
5. expiry, with :data:`CLOCK_SKEW_S` of leeway for the clocks of the nodes of a cluster: the
   token is refused from ``now >= exp + CLOCK_SKEW_S`` -> ``"expired"``;
6. the ``jti`` is not in the given :class:`Revocations` -> ``"revoked"``.

Nothing else ever escapes ``verify`` for any input string.

Other helpers
-------------
:func:`user_hash` / :func:`verify_user_hash` implement the protocol's
``user_hash = hex(HMAC-SHA256(identity_secret, user_id))``; :func:`secret_equals` compares the
admin token and the API key; :func:`hash_token` is how agent tokens are stored at rest;
:func:`new_secret` makes a fresh secret. :func:`credential_tag` binds an agent session token to
the long-lived agent token it was obtained with (``kefu.node``, "Agent tokens"): a keyed
fingerprint, so that the token (readable by whoever holds it) says nothing a guess of a weak
configured agent token could be checked against offline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import math
import re
import secrets
import time
from collections.abc import Iterable
from typing import Annotated, Final, Literal, TypeAlias, get_args

import msgspec
from msgspec import Meta, Struct, field

__all__ = [
    "CLOCK_SKEW_S",
    "MAX_SIGNED_TOKEN_CHARS",
    "Revocations",
    "TokenClaims",
    "TokenError",
    "TokenErrorReason",
    "TokenKind",
    "TokenSigner",
    "credential_tag",
    "credential_tag_key",
    "hash_token",
    "new_secret",
    "secret_equals",
    "user_hash",
    "verify_user_hash",
]

TokenKind: TypeAlias = Literal["visitor", "agent"]
TokenErrorReason: TypeAlias = Literal[
    "malformed", "bad_signature", "wrong_kind", "expired", "revoked"
]

#: Seconds a token stays valid past its ``exp``: clocks of the nodes of a cluster drift apart.
CLOCK_SKEW_S: Final = 30
#: Longest token :meth:`TokenSigner.verify` looks at; well under ``protocol.MAX_TOKEN_CHARS``.
MAX_SIGNED_TOKEN_CHARS: Final = 2_048
#: Shortest signing secret accepted: 128 bits, the least for an HMAC key worth the name.
MIN_SECRET_BYTES: Final = 16

_VERSION: Final = "v1"
_KEY_LABEL: Final = b"kefu token signing v1"
_TAG_LABEL: Final = b"kefu agent credential tag v1"
_TAG_BYTES: Final = 16  # 128 bits: collisions between two tokens of one agent are out of reach
_SIG_CHARS: Final = 43  # base64url of 32 bytes, without padding
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+")
_KINDS: Final = frozenset(get_args(TokenKind))
_HEX: Final = frozenset("0123456789abcdefABCDEF")


class TokenError(Exception):
    """A token is refused; ``reason`` is one of :data:`TokenErrorReason`."""

    def __init__(self, reason: TokenErrorReason) -> None:
        super().__init__(reason)
        self.reason: TokenErrorReason = reason


class TokenClaims(Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What a token says: ``sub`` (visitor or agent id) may act as ``kind`` until ``exp``.

    ``iat`` and ``exp`` are Unix seconds; ``jti`` is random, the handle for revocation.
    """

    kind: TokenKind
    sub: Annotated[str, Meta(min_length=1)]
    iat: int
    exp: int
    jti: Annotated[str, Meta(min_length=1)]
    extra: dict[str, str] = field(default_factory=dict)


_encode_claims = msgspec.msgpack.Encoder().encode
_decode_claims = msgspec.msgpack.Decoder(TokenClaims).decode


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signing_key(secret: bytes) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a token signing secret needs at least {MIN_SECRET_BYTES} bytes")
    return hmac.digest(secret, _KEY_LABEL, "sha256")


def _sign(key: bytes, signed_part: str) -> bytes:
    return _b64encode(hmac.digest(key, signed_part.encode("ascii"), "sha256")).encode("ascii")


class Revocations:
    """Revoked token ids (``jti``), each kept until its token would expire anyway.

    The set is bounded by ``max_entries`` so that revoking cannot grow memory without limit.
    When it is full, :meth:`revoke` refuses (returns ``False``) rather than forgetting an
    earlier revocation, which would silently make that token valid again: the caller must
    then rotate the signing secret (``TokenSigner(new, previous=[...])`` without the old
    secret), which invalidates every outstanding token at once.
    """

    __slots__ = ("_by_jti", "_heap", "max_entries")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._by_jti: dict[str, int] = {}
        # (drop_at, jti), one per entry of _by_jti: the earliest to drop is at the top.
        self._heap: list[tuple[int, str]] = []

    def _purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, jti = heapq.heappop(heap)
            del self._by_jti[jti]

    def revoke(self, jti: str, exp: int, now: float | None = None) -> bool:
        """Revokes the token ``jti`` expiring at ``exp``; ``False`` when the set is full."""
        now = time.time() if now is None else now
        self._purge(now)
        # A token is accepted until exp + CLOCK_SKEW_S, so its revocation must last as long.
        drop_at = exp + CLOCK_SKEW_S
        if drop_at <= now or jti in self._by_jti:
            return True  # already refused as expired, or already revoked
        if len(self._by_jti) >= self.max_entries:
            return False
        self._by_jti[jti] = drop_at
        heapq.heappush(self._heap, (drop_at, jti))
        return True

    def is_revoked(self, jti: str, now: float | None = None) -> bool:
        self._purge(time.time() if now is None else now)
        return jti in self._by_jti

    def entries(self, now: float | None = None) -> list[tuple[str, int]]:
        """The revocations in force as ``(jti, exp)`` pairs, to be stored and given back to
        :meth:`revoke` after a restart."""
        self._purge(time.time() if now is None else now)
        return [(jti, drop_at - CLOCK_SKEW_S) for jti, drop_at in self._by_jti.items()]

    def __len__(self) -> int:
        return len(self._by_jti)


class TokenSigner:
    """Issues and verifies tokens (format and checks in the module docstring).

    Tokens are signed with ``secret``; those signed with any of ``previous`` still verify, so
    a secret can be rotated without logging everybody out: deploy ``TokenSigner(new,
    previous=[old])``, and drop ``old`` once the longest TTL has passed.
    """

    __slots__ = ("_key", "_keys")

    def __init__(self, secret: bytes, previous: Iterable[bytes] = ()) -> None:
        self._key = _signing_key(secret)
        self._keys: tuple[bytes, ...] = (self._key, *(_signing_key(s) for s in previous))

    def issue(
        self,
        kind: TokenKind,
        subject: str,
        ttl_s: int,
        now: float | None = None,
        *,
        extra: dict[str, str] | None = None,
    ) -> str:
        """A token for ``subject`` acting as ``kind``, valid for ``ttl_s`` seconds from ``now``.

        Raises ``ValueError`` for an unknown kind, an empty subject, ``ttl_s < 1``, or claims
        too large for :data:`MAX_SIGNED_TOKEN_CHARS`.
        """
        if kind not in _KINDS:
            raise ValueError(f"unknown token kind {kind!r}")
        if not subject:
            raise ValueError("subject must not be empty")
        if ttl_s < 1:
            raise ValueError("ttl_s must be >= 1")
        iat = math.floor(time.time() if now is None else now)
        claims = TokenClaims(
            kind=kind,
            sub=subject,
            iat=iat,
            exp=iat + ttl_s,
            jti=secrets.token_urlsafe(16),
            extra=dict(extra) if extra else {},
        )
        signed_part = f"{_VERSION}.{_b64encode(_encode_claims(claims))}"
        token = f"{signed_part}.{_sign(self._key, signed_part).decode('ascii')}"
        if len(token) > MAX_SIGNED_TOKEN_CHARS:
            raise ValueError(f"token longer than {MAX_SIGNED_TOKEN_CHARS} characters")
        return token

    def verify(
        self,
        token: str,
        kind: TokenKind,
        now: float | None = None,
        *,
        revocations: Revocations | None = None,
    ) -> TokenClaims:
        """The claims of ``token`` if it is valid for ``kind`` at ``now``, else ``TokenError``."""
        if kind not in _KINDS:
            raise ValueError(f"unknown token kind {kind!r}")
        if not isinstance(token, str) or len(token) > MAX_SIGNED_TOKEN_CHARS:
            raise TokenError("malformed")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _VERSION:
            raise TokenError("malformed")
        _, payload_b64, sig = parts
        if (
            len(sig) != _SIG_CHARS
            or _B64URL.fullmatch(sig) is None
            or _B64URL.fullmatch(payload_b64) is None
        ):
            raise TokenError("malformed")

        signed_part = f"{_VERSION}.{payload_b64}"
        given = sig.encode("ascii")
        # Every key is tried whatever the outcome: the time taken says nothing about which.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(_sign(key, signed_part), given)
        if not ok:
            raise TokenError("bad_signature")

        try:
            claims = _decode_claims(_b64decode(payload_b64))
        except (binascii.Error, ValueError, msgspec.DecodeError):
            raise TokenError("malformed") from None
        if claims.kind != kind:
            raise TokenError("wrong_kind")
        now = time.time() if now is None else now
        if now >= claims.exp + CLOCK_SKEW_S:
            raise TokenError("expired")
        if revocations is not None and revocations.is_revoked(claims.jti, now):
            raise TokenError("revoked")
        return claims


def user_hash(secret: bytes, user_id: str) -> str:
    """``hex(HMAC-SHA256(identity_secret, user_id))``, the value the host site computes."""
    return hmac.new(secret, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def verify_user_hash(secret: bytes, user_id: str, given: object) -> bool:
    """Whether ``given`` is the ``user_hash`` of ``user_id``, in constant time.

    Hex digits of either case are accepted; anything that is not 64 hex digits is ``False``.
    """
    if not isinstance(given, str) or len(given) != 64 or not _HEX.issuperset(given):
        return False
    expected = user_hash(secret, user_id).encode("ascii")
    return hmac.compare_digest(expected, given.lower().encode("ascii"))


# Per-process key for secret_equals: comparing digests hides the lengths of the two strings.
_COMPARE_KEY: Final = secrets.token_bytes(32)


def secret_equals(given: str, expected: str) -> bool:
    """Constant-time equality of two secrets (admin token, API key).

    An empty string never matches, so an unset secret cannot be satisfied by an empty header.
    """
    if not given or not expected:
        return False
    a = hmac.digest(_COMPARE_KEY, given.encode("utf-8", "surrogatepass"), "sha256")
    b = hmac.digest(_COMPARE_KEY, expected.encode("utf-8", "surrogatepass"), "sha256")
    return hmac.compare_digest(a, b)


def credential_tag_key(secret: bytes) -> bytes:
    """The key of :func:`credential_tag`, derived from the token-signing secret under its own
    label (as the signing key is), so that neither value can stand for the other."""
    return hmac.digest(secret, _TAG_LABEL, "sha256")


def credential_tag(key: bytes, token_hash: str) -> str:
    """A keyed fingerprint of a stored token hash (base64url, 22 characters)."""
    digest = hmac.digest(key, token_hash.encode("ascii"), "sha256")
    return _b64encode(digest[:_TAG_BYTES])


def new_secret() -> str:
    """A fresh secret: 32 random bytes, base64url (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 hex of a token, for storing agent tokens at rest (they are random, not passwords,
    so no slow hash is needed)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
