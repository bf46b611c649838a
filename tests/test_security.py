"""kefu.security: signed tokens, revocations, user_hash and constant-time compares."""

from __future__ import annotations

import base64
import hashlib
import hmac
import string

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kefu.security import (
    CLOCK_SKEW_S,
    MAX_SIGNED_TOKEN_CHARS,
    Revocations,
    TokenClaims,
    TokenError,
    TokenSigner,
    hash_token,
    new_secret,
    secret_equals,
    user_hash,
    verify_user_hash,
)

SECRET = b"0123456789abcdef0123456789abcdef"
OLD_SECRET = b"old-secret-old-secret-old-secret"
NOW = 1_700_000_000.0
TTL = 3_600
SIGNER = TokenSigner(SECRET)
TOKEN = SIGNER.issue("visitor", "v-1", TTL, NOW, extra={"conv": "abc"})
# Characters a mutation may put in: the token alphabet, its separators and some strangers.
MUTATION_CHARS = string.ascii_letters + string.digits + "-_.=+/ \x00é€"


def _reason(token: str, kind: str = "visitor", **kw: object) -> str:
    with pytest.raises(TokenError) as info:
        SIGNER.verify(token, kind, NOW, **kw)  # type: ignore[arg-type]
    return info.value.reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- issue / verify -----------------------------------------------------------------------------


def test_round_trip() -> None:
    claims = SIGNER.verify(TOKEN, "visitor", NOW + 1)
    assert claims.kind == "visitor"
    assert claims.sub == "v-1"
    assert claims.iat == int(NOW)
    assert claims.exp == int(NOW) + TTL
    assert claims.extra == {"conv": "abc"}
    assert len(claims.jti) >= 16


def test_format() -> None:
    version, payload, sig = TOKEN.split(".")
    assert version == "v1"
    assert "=" not in TOKEN
    claims = msgspec.msgpack.decode(base64.urlsafe_b64decode(payload + "=="), type=TokenClaims)
    assert claims.sub == "v-1"
    assert len(base64.urlsafe_b64decode(sig + "=")) == 32


def test_every_token_gets_a_fresh_jti() -> None:
    jtis = {
        SIGNER.verify(SIGNER.issue("agent", "a", TTL, NOW), "agent", NOW).jti for _ in range(50)
    }
    assert len(jtis) == 50


def test_issue_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SIGNER.issue("admin", "x", TTL, NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SIGNER.issue("visitor", "", TTL, NOW)
    with pytest.raises(ValueError):
        SIGNER.issue("visitor", "x", 0, NOW)
    with pytest.raises(ValueError):
        SIGNER.issue("visitor", "x", TTL, NOW, extra={"big": "x" * MAX_SIGNED_TOKEN_CHARS})
    with pytest.raises(ValueError):
        TokenSigner(b"short")


def test_wrong_kind() -> None:
    assert _reason(TOKEN, "agent") == "wrong_kind"
    agent = SIGNER.issue("agent", "alice", TTL, NOW)
    assert SIGNER.verify(agent, "agent", NOW).sub == "alice"
    assert _reason(agent, "visitor") == "wrong_kind"


def test_expiry_boundary_with_skew() -> None:
    token = SIGNER.issue("visitor", "v", 60, 1000.0)
    SIGNER.verify(token, "visitor", 1000.0)
    SIGNER.verify(token, "visitor", 1060.0)  # past exp, inside the skew
    SIGNER.verify(token, "visitor", 1060.0 + CLOCK_SKEW_S - 0.001)
    for now in (1060.0 + CLOCK_SKEW_S, 1060.0 + CLOCK_SKEW_S + 1, 10**12):
        with pytest.raises(TokenError) as info:
            SIGNER.verify(token, "visitor", now)
        assert info.value.reason == "expired"


def test_fractional_now_is_floored() -> None:
    token = SIGNER.issue("visitor", "v", 10, 1000.9)
    assert SIGNER.verify(token, "visitor", 1000.9).exp == 1010


def test_tampered_payload_with_recomputed_layout_fails() -> None:
    # Same signature, forged claims (a longer TTL): the signature no longer matches.
    _, _, sig = TOKEN.split(".")
    forged = TokenClaims(kind="visitor", sub="v-1", iat=int(NOW), exp=2**40, jti="x")
    payload = _b64(msgspec.msgpack.encode(forged))
    assert _reason(f"v1.{payload}.{sig}") == "bad_signature"
    # Signed with another secret.
    other = TokenSigner(b"another-secret-another-secret!!!").issue("visitor", "v-1", TTL, NOW)
    assert _reason(other) == "bad_signature"


def test_every_single_character_change_fails() -> None:
    valid = {"bad_signature", "malformed"}
    for i, original in enumerate(TOKEN):
        for c in MUTATION_CHARS:
            if c == original:
                continue
            assert _reason(TOKEN[:i] + c + TOKEN[i + 1 :]) in valid, (i, c)
        assert _reason(TOKEN[:i] + TOKEN[i + 1 :]) in valid, i  # deletion
        assert _reason(TOKEN[:i] + "A" + TOKEN[i:]) in valid, i  # insertion
    assert _reason(TOKEN + "A") in valid
    assert _reason(TOKEN[:-1]) in valid


def test_signature_padding_bits_cannot_be_flipped() -> None:
    # The last of 43 base64 characters carries 2 unused bits: another character with the same
    # 4 leading bits decodes to the same bytes, yet must not verify (one spelling per token).
    head, sig = TOKEN.rsplit(".", 1)
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    index = alphabet.index(sig[-1])
    for twin in alphabet[index & ~3 : (index & ~3) + 4]:
        if twin != sig[-1]:
            assert base64.urlsafe_b64decode(sig[:-1] + twin + "=") == base64.urlsafe_b64decode(
                sig + "="
            )
            assert _reason(f"{head}.{sig[:-1]}{twin}") == "bad_signature"


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "..",
        "v1..",
        "v1.abc",
        "v2." + TOKEN[3:],
        TOKEN + ".x",
        TOKEN.replace("v1.", "v1..", 1),
        "x" * (MAX_SIGNED_TOKEN_CHARS + 1),
        "v1." + "A" * MAX_SIGNED_TOKEN_CHARS + "." + "A" * 43,
        TOKEN.rsplit(".", 1)[0] + ".=" + TOKEN.rsplit(".", 1)[1][1:],
        TOKEN.rsplit(".", 1)[0] + ".abc",  # a signature of the wrong length: no HMAC work
    ],
)
def test_malformed(token: str) -> None:
    assert _reason(token) == "malformed"


def test_signed_but_undecodable_payload_is_malformed() -> None:
    # Only we can sign, but a payload of another layout must still be a TokenError.
    from kefu.security import _sign, _signing_key  # the signing primitive, to forge a layout

    for raw in (b"\xc1", msgspec.msgpack.encode({"kind": "visitor"}), b"", b"\x93\x01\x02\x03"):
        signed = f"v1.{_b64(raw) or 'AA'}"
        token = f"{signed}.{_sign(_signing_key(SECRET), signed).decode()}"
        assert _reason(token) == "malformed"


def test_rotation() -> None:
    old = TokenSigner(OLD_SECRET)
    old_token = old.issue("agent", "alice", TTL, NOW)
    rotated = TokenSigner(SECRET, previous=[OLD_SECRET])
    assert rotated.verify(old_token, "agent", NOW).sub == "alice"
    # New tokens are signed with the current secret only.
    new_token = rotated.issue("agent", "bob", TTL, NOW)
    assert SIGNER.verify(new_token, "agent", NOW).sub == "bob"
    with pytest.raises(TokenError) as info:
        old.verify(new_token, "agent", NOW)
    assert info.value.reason == "bad_signature"
    # Once the old secret is dropped, its tokens stop verifying.
    with pytest.raises(TokenError) as info:
        SIGNER.verify(old_token, "agent", NOW)
    assert info.value.reason == "bad_signature"


def test_signing_key_is_separated_from_user_hash() -> None:
    # A visitor picking user_id = "v1.<payload>" gets HMAC(secret, user_id) from the host site:
    # that must not be a token signature.
    forged = TokenClaims(kind="agent", sub="root", iat=int(NOW), exp=2**40, jti="x")
    signed = "v1." + _b64(msgspec.msgpack.encode(forged))
    sig = _b64(bytes.fromhex(user_hash(SECRET, signed)))
    assert _reason(f"{signed}.{sig}", "agent") == "bad_signature"


# -- revocations -------------------------------------------------------------------------------


def test_revocation() -> None:
    revocations = Revocations(10)
    claims = SIGNER.verify(TOKEN, "visitor", NOW, revocations=revocations)
    assert revocations.revoke(claims.jti, claims.exp, NOW)
    assert _reason(TOKEN, revocations=revocations) == "revoked"
    other = SIGNER.issue("visitor", "v-2", TTL, NOW)
    assert SIGNER.verify(other, "visitor", NOW, revocations=revocations).sub == "v-2"


def test_revocation_lasts_until_expiry_plus_skew_then_drops() -> None:
    revocations = Revocations(1)
    assert revocations.revoke("j", exp=1000, now=900)
    assert revocations.is_revoked("j", 1000 + CLOCK_SKEW_S - 1)
    assert not revocations.is_revoked("j", 1000 + CLOCK_SKEW_S)
    assert len(revocations) == 0
    # The slot is free again.
    assert revocations.revoke("k", exp=5000, now=2000)


def test_revocations_are_bounded_and_refuse_when_full() -> None:
    revocations = Revocations(3)
    for i in range(3):
        assert revocations.revoke(f"j{i}", exp=2000 + i, now=1000)
    assert not revocations.revoke("j3", exp=1500, now=1000)
    assert len(revocations) == 3
    assert not revocations.is_revoked("j3", 1000)
    # Nothing already revoked was forgotten.
    assert all(revocations.is_revoked(f"j{i}", 1000) for i in range(3))
    # Re-revoking a known jti, or an already expired token, needs no room.
    assert revocations.revoke("j1", exp=2001, now=1000)
    assert revocations.revoke("old", exp=900, now=1000)
    assert len(revocations) == 3
    # Room comes back as entries expire.
    assert revocations.revoke("j3", exp=5000, now=2000 + CLOCK_SKEW_S)
    assert len(revocations) == 3
    with pytest.raises(ValueError):
        Revocations(0)


# -- user_hash ---------------------------------------------------------------------------------


def test_user_hash_known_answer() -> None:
    secret, user = b"kefu-test-secret", "user-42"
    expected = hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()
    assert user_hash(secret, user) == expected
    assert user_hash(secret, user) == (
        "e8c124d26aa2434e04f2a1c08fc1118d616b6fc2ce59f234a77732dd53b234e6"
    )
    # RFC 4231, test case 2.
    assert user_hash(b"Jefe", "what do ya want for nothing?") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )
    assert user_hash(secret, "user-43") != expected


def test_verify_user_hash() -> None:
    good = user_hash(SECRET, "u1")
    assert verify_user_hash(SECRET, "u1", good)
    assert verify_user_hash(SECRET, "u1", good.upper())
    assert not verify_user_hash(SECRET, "u2", good)
    assert not verify_user_hash(b"other", "u1", good)
    flipped = good[:-1] + ("0" if good[-1] != "0" else "1")
    assert not verify_user_hash(SECRET, "u1", flipped)


@pytest.mark.parametrize(
    "garbage",
    ["", "zz", "g" * 64, "0" * 63, "0" * 65, "é" * 64, " " + "0" * 63, None, 123, b"0" * 64],
)
def test_verify_user_hash_garbage_is_false(garbage: object) -> None:
    assert verify_user_hash(SECRET, "u1", garbage) is False


@given(st.text(max_size=100))
def test_verify_user_hash_never_raises(garbage: str) -> None:
    assert verify_user_hash(SECRET, "u1", garbage) is False


# -- secrets -----------------------------------------------------------------------------------


def test_secret_equals() -> None:
    assert secret_equals("admin-token", "admin-token")
    assert not secret_equals("admin-token", "admin-tokeN")
    assert not secret_equals("admin", "admin-token")
    assert not secret_equals("", "")
    assert not secret_equals("", "x")
    assert secret_equals("ключ", "ключ")


def test_new_secret_and_hash_token() -> None:
    a, b = new_secret(), new_secret()
    assert a != b
    assert len(base64.urlsafe_b64decode(a + "=")) == 32
    TokenSigner(a.encode())  # long enough to sign with
    assert hash_token("tok") == hashlib.sha256(b"tok").hexdigest()
    assert len(hash_token(a)) == 64


# -- fuzz --------------------------------------------------------------------------------------


@settings(max_examples=500)
@given(st.text(max_size=MAX_SIGNED_TOKEN_CHARS + 10))
def test_fuzz_random_strings(token: str) -> None:
    with pytest.raises(TokenError):
        SIGNER.verify(token, "visitor", NOW)


@settings(max_examples=300)
@given(
    st.text(alphabet="v1.-_" + string.ascii_letters + string.digits, max_size=300),
)
def test_fuzz_token_shaped_strings(token: str) -> None:
    with pytest.raises(TokenError):
        SIGNER.verify(token, "visitor", NOW)


@settings(max_examples=500)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["replace", "insert", "delete"]),
            st.integers(min_value=0, max_value=len(TOKEN)),
            st.sampled_from(MUTATION_CHARS),
        ),
        max_size=5,
    )
)
def test_fuzz_mutated_tokens(edits: list[tuple[str, int, str]]) -> None:
    token = TOKEN
    for op, i, c in edits:
        i = min(i, len(token))
        if op == "replace":
            token = token[:i] + c + token[i + 1 :]
        elif op == "insert":
            token = token[:i] + c + token[i:]
        else:
            token = token[:i] + token[i + 1 :]
    if token == TOKEN:
        assert SIGNER.verify(token, "visitor", NOW).sub == "v-1"
    else:
        assert _reason(token) in {"bad_signature", "malformed"}
