"""ingestd.signature held against published JWS vectors (RFC 7515, RFC 8037).

RS256, ES256 and EdDSA are checked against the examples printed in the RFCs; PS256 and
DS256 have no published JWS vectors, so they get round trips with keys made here plus
the negative cases that matter (wrong salt length, DER instead of r||s, wrong width).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ingestd.errors import KeyFileError
from ingestd.signature import (
    ALGS,
    ED25519_ALGS,
    Alg,
    PrivateKey,
    PublicKey,
    Signer,
    b64url_decode,
    b64url_encode,
    check_key_for_alg,
    generate_private_key,
    is_alg,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
    sign,
    verify,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

# --- RFC 7515 (JSON Web Signature), Appendix A ------------------------------------------

# A.1-A.3 share this payload: BASE64URL of {"iss":"joe",\r\n "exp":1300819380,\r\n
# "http://example.com/is_root":true}.
RFC7515_PAYLOAD = (
    "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
)

# RFC 7515 Appendix A.2.1: the RSA public key (JWK "n", "e").
RFC7515_A2_N = (
    "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddx"
    "HmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMs"
    "D1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSH"
    "SXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdV"
    "MTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8"
    "NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ"
)
RFC7515_A2_E = "AQAB"
# RFC 7515 Appendix A.2.1: JWS Protected Header {"alg":"RS256"} and the JWS Signature.
RFC7515_A2_PROTECTED = "eyJhbGciOiJSUzI1NiJ9"
RFC7515_A2_SIGNATURE = (
    "cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZ"
    "mh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjb"
    "KBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHl"
    "b1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZES"
    "c6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AX"
    "LIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw"
)

# RFC 7515 Appendix A.3.1: the P-256 public key (JWK "x", "y").
RFC7515_A3_X = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU"
RFC7515_A3_Y = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"
# RFC 7515 Appendix A.3.1: JWS Protected Header {"alg":"ES256"} and the 64-octet r||s.
RFC7515_A3_PROTECTED = "eyJhbGciOiJFUzI1NiJ9"
RFC7515_A3_SIGNATURE = (
    "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q"
)
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

# --- RFC 8037 (CFRG curves in JOSE), Appendix A -----------------------------------------

# RFC 8037 Appendix A.1 (private "d") and A.2 (public "x") of the Ed25519 key.
RFC8037_A1_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_A2_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
# RFC 8037 Appendix A.4: {"alg":"EdDSA"}, payload "Example of Ed25519 signing", signature.
RFC8037_A4_PROTECTED = "eyJhbGciOiJFZERTQSJ9"
RFC8037_A4_PAYLOAD = "RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
RFC8037_A4_SIGNATURE = (
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)
ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493

MESSAGE = b"eyJhbGciOiJ4In0.eyJhIjoxfQ"


def _int(b64: str) -> int:
    return int.from_bytes(b64url_decode(b64), "big")


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    """``data`` with one bit changed."""
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def _signing_input(protected: str, payload: str) -> bytes:
    return f"{protected}.{payload}".encode("ascii")


@pytest.fixture(scope="module")
def keys() -> dict[Alg, PrivateKey]:
    """One private key per alg (DSA parameter generation is the slow one: made once)."""
    return {alg: generate_private_key(alg) for alg in ALGS}


# --- RFC 7515 A.2: RS256 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rfc7515_rsa_key() -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(_int(RFC7515_A2_E), _int(RFC7515_A2_N)).public_key()


A2_INPUT = _signing_input(RFC7515_A2_PROTECTED, RFC7515_PAYLOAD)
A2_SIG = b64url_decode(RFC7515_A2_SIGNATURE)


def test_rfc7515_a2_rs256_verifies(rfc7515_rsa_key: rsa.RSAPublicKey) -> None:
    assert rfc7515_rsa_key.key_size == 2048
    assert verify("RS256", rfc7515_rsa_key, A2_SIG, A2_INPUT) is True
    # The RFC key is 2048 bits: good enough for the loader too.
    check_key_for_alg(rfc7515_rsa_key, "RS256")


@pytest.mark.parametrize("index", [0, 20, -1])
def test_rfc7515_a2_rs256_tampered(rfc7515_rsa_key: rsa.RSAPublicKey, index: int) -> None:
    assert verify("RS256", rfc7515_rsa_key, A2_SIG, _flip(A2_INPUT, index)) is False
    assert verify("RS256", rfc7515_rsa_key, _flip(A2_SIG, index), A2_INPUT) is False


def test_rfc7515_a2_signature_is_not_ps256(rfc7515_rsa_key: rsa.RSAPublicKey) -> None:
    assert verify("PS256", rfc7515_rsa_key, A2_SIG, A2_INPUT) is False


# --- RFC 7515 A.3: ES256 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rfc7515_ec_key() -> ec.EllipticCurvePublicKey:
    numbers = ec.EllipticCurvePublicNumbers(_int(RFC7515_A3_X), _int(RFC7515_A3_Y), ec.SECP256R1())
    return numbers.public_key()


A3_INPUT = _signing_input(RFC7515_A3_PROTECTED, RFC7515_PAYLOAD)
A3_SIG = b64url_decode(RFC7515_A3_SIGNATURE)


def test_rfc7515_a3_es256_verifies(rfc7515_ec_key: ec.EllipticCurvePublicKey) -> None:
    assert len(A3_SIG) == 64
    assert verify("ES256", rfc7515_ec_key, A3_SIG, A3_INPUT) is True
    check_key_for_alg(rfc7515_ec_key, "ES256")


@pytest.mark.parametrize("index", [0, 31, 32, -1])
def test_rfc7515_a3_es256_tampered(rfc7515_ec_key: ec.EllipticCurvePublicKey, index: int) -> None:
    assert verify("ES256", rfc7515_ec_key, A3_SIG, _flip(A3_INPUT, index)) is False
    assert verify("ES256", rfc7515_ec_key, _flip(A3_SIG, index), A3_INPUT) is False


def test_rfc7515_a3_es256_rejects_der(rfc7515_ec_key: ec.EllipticCurvePublicKey) -> None:

    r, s = int.from_bytes(A3_SIG[:32], "big"), int.from_bytes(A3_SIG[32:], "big")
    der = encode_dss_signature(r, s)
    assert verify("ES256", rfc7515_ec_key, der, A3_INPUT) is False
    # Truncated or padded r||s: not 64 bytes, not a signature.
    assert verify("ES256", rfc7515_ec_key, A3_SIG[:-1], A3_INPUT) is False
    assert verify("ES256", rfc7515_ec_key, A3_SIG + b"\0", A3_INPUT) is False
    assert verify("ES256", rfc7515_ec_key, b"\0" + A3_SIG, A3_INPUT) is False


def test_rfc7515_a3_es256_malleability_is_known(
    rfc7515_ec_key: ec.EllipticCurvePublicKey,
) -> None:
    """The RFC's own s is "high" (> n/2), so a verifier enforcing low-s would reject the RFC.

    ECDSA therefore admits a second valid signature (r, n - s) of the same input: the
    pipeline must recognise duplicates by payload, never by signature bytes.
    """
    s = int.from_bytes(A3_SIG[32:], "big")
    assert s > P256_ORDER // 2
    twin = A3_SIG[:32] + (P256_ORDER - s).to_bytes(32, "big")
    assert verify("ES256", rfc7515_ec_key, twin, A3_INPUT) is True


# --- RFC 8037 A.4/A.5: EdDSA (Ed25519) ------------------------------------------------------


@pytest.fixture(scope="module")
def rfc8037_public_key() -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(RFC8037_A2_X))


A4_INPUT = _signing_input(RFC8037_A4_PROTECTED, RFC8037_A4_PAYLOAD)
A4_SIG = b64url_decode(RFC8037_A4_SIGNATURE)


def test_rfc8037_a4_payload_is_the_published_text() -> None:
    assert b64url_decode(RFC8037_A4_PAYLOAD) == b"Example of Ed25519 signing"
    assert orjson.loads(b64url_decode(RFC8037_A4_PROTECTED)) == {"alg": "EdDSA"}


def test_rfc8037_a5_eddsa_verifies(rfc8037_public_key: ed25519.Ed25519PublicKey) -> None:
    assert verify("EdDSA", rfc8037_public_key, A4_SIG, A4_INPUT) is True
    check_key_for_alg(rfc8037_public_key, "EdDSA")


@pytest.mark.parametrize("index", [0, 31, 32, -1])
def test_rfc8037_a5_eddsa_tampered(rfc8037_public_key: ed25519.Ed25519PublicKey, index: int) -> None:
    assert verify("EdDSA", rfc8037_public_key, A4_SIG, _flip(A4_INPUT, index)) is False
    assert verify("EdDSA", rfc8037_public_key, _flip(A4_SIG, index), A4_INPUT) is False


def test_rfc8037_a5_eddsa_rejects_non_canonical_s(
    rfc8037_public_key: ed25519.Ed25519PublicKey,
) -> None:
    """S + L is the same scalar mod L, but RFC 8032 requires S < L: no malleable twin."""
    s = int.from_bytes(A4_SIG[32:], "little")
    twin = A4_SIG[:32] + (s + ED25519_ORDER).to_bytes(32, "little")
    assert verify("EdDSA", rfc8037_public_key, twin, A4_INPUT) is False
    assert verify("EdDSA", rfc8037_public_key, A4_SIG[:-1], A4_INPUT) is False
    assert verify("EdDSA", rfc8037_public_key, A4_SIG + b"\0", A4_INPUT) is False


def test_rfc8037_a4_signing_reproduces_the_signature(
    rfc8037_public_key: ed25519.Ed25519PublicKey,
) -> None:
    private = ed25519.Ed25519PrivateKey.from_private_bytes(b64url_decode(RFC8037_A1_D))
    assert private.public_key().public_bytes_raw() == rfc8037_public_key.public_bytes_raw()
    assert b64url_encode(sign("EdDSA", private, A4_INPUT)) == RFC8037_A4_SIGNATURE


def test_ed25519_is_eddsa_under_its_fully_specified_name(
    rfc8037_public_key: ed25519.Ed25519PublicKey,
) -> None:
    """RFC 9864: `Ed25519` names exactly the signature RFC 8037 calls `EdDSA` with an
    Ed25519 key, so the A.4 signature verifies under both names, and signs the same."""
    assert verify("Ed25519", rfc8037_public_key, A4_SIG, A4_INPUT) is True
    assert verify("Ed25519", rfc8037_public_key, _flip(A4_SIG, 0), A4_INPUT) is False
    check_key_for_alg(rfc8037_public_key, "Ed25519")
    private = ed25519.Ed25519PrivateKey.from_private_bytes(b64url_decode(RFC8037_A1_D))
    assert b64url_encode(sign("Ed25519", private, A4_INPUT)) == RFC8037_A4_SIGNATURE


def test_rfc8037_signer_reproduces_the_a4_jws() -> None:
    """Signer with the A.1 key and a header of just {"alg":"EdDSA"} yields A.4's JWS."""
    private = ed25519.Ed25519PrivateKey.from_private_bytes(b64url_decode(RFC8037_A1_D))
    signer = Signer("EdDSA", "rfc8037", private)
    jws = orjson.loads(signer.sign_body(b"Example of Ed25519 signing", protected=RFC8037_A4_PROTECTED))
    assert jws == {
        "protected": RFC8037_A4_PROTECTED,
        "payload": RFC8037_A4_PAYLOAD,
        "signature": RFC8037_A4_SIGNATURE,
    }


# --- PS256 and DS256: no published JWS vectors ------------------------------------------------


def _rsa(keys: dict[Alg, PrivateKey]) -> rsa.RSAPrivateKey:
    key = keys["PS256"]
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _dsa(keys: dict[Alg, PrivateKey]) -> dsa.DSAPrivateKey:
    key = keys["DS256"]
    assert isinstance(key, dsa.DSAPrivateKey)
    return key


def _pss(salt_length: int) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length)


@pytest.mark.parametrize("alg", ["PS256", "DS256"])
def test_round_trip_and_tamper(keys: dict[Alg, PrivateKey], alg: Alg) -> None:
    key = keys[alg]
    public = key.public_key()
    signature = sign(alg, key, MESSAGE)
    assert verify(alg, public, signature, MESSAGE) is True
    assert verify(alg, public, signature, _flip(MESSAGE, 0)) is False
    assert verify(alg, public, signature, MESSAGE + b".") is False
    assert verify(alg, public, _flip(signature, -1), MESSAGE) is False
    assert verify(alg, public, _flip(signature, 0, 7), MESSAGE) is False


def test_ps256_salt_is_32(keys: dict[Alg, PrivateKey]) -> None:
    key = _rsa(keys)
    public = key.public_key()
    # The salt length is pinned: a signature with any other salt is not a PS256 signature.
    explicit = key.sign(MESSAGE, _pss(32), hashes.SHA256())
    assert verify("PS256", public, explicit, MESSAGE) is True
    max_salt = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    assert verify("PS256", public, key.sign(MESSAGE, max_salt, hashes.SHA256()), MESSAGE) is False
    for salt in (0, 20, 31, 33, 64):
        other = key.sign(MESSAGE, _pss(salt), hashes.SHA256())
        assert verify("PS256", public, other, MESSAGE) is False, salt
    # And our own PS256 output carries a 32-byte salt: it verifies under salt_length=32.
    public.verify(sign("PS256", key, MESSAGE), MESSAGE, _pss(32), hashes.SHA256())


def test_ps256_is_randomised_rs256_is_not(keys: dict[Alg, PrivateKey]) -> None:
    key = _rsa(keys)
    assert sign("PS256", key, MESSAGE) != sign("PS256", key, MESSAGE)
    assert sign("RS256", key, MESSAGE) == sign("RS256", key, MESSAGE)


def test_rs256_and_ps256_do_not_cross(keys: dict[Alg, PrivateKey]) -> None:
    key = _rsa(keys)
    public = key.public_key()
    assert verify("PS256", public, sign("RS256", key, MESSAGE), MESSAGE) is False
    assert verify("RS256", public, sign("PS256", key, MESSAGE), MESSAGE) is False


def test_ds256_width_follows_q(keys: dict[Alg, PrivateKey]) -> None:
    key = _dsa(keys)
    q_bytes = (key.parameters().parameter_numbers().q.bit_length() + 7) // 8
    for _ in range(8):  # r or s often has a leading zero byte: it must still be padded
        assert len(sign("DS256", key, MESSAGE)) == 2 * q_bytes


def test_ds256_rejects_der_and_wrong_width(keys: dict[Alg, PrivateKey]) -> None:

    key = _dsa(keys)
    public = key.public_key()
    q_bytes = (key.parameters().parameter_numbers().q.bit_length() + 7) // 8
    der = key.sign(MESSAGE, hashes.SHA256())
    assert verify("DS256", public, der, MESSAGE) is False
    r, s = decode_dss_signature(der)
    rs = r.to_bytes(q_bytes, "big") + s.to_bytes(q_bytes, "big")
    assert verify("DS256", public, rs, MESSAGE) is True
    assert verify("DS256", public, rs[:-1], MESSAGE) is False
    assert verify("DS256", public, rs + b"\0", MESSAGE) is False
    assert verify("DS256", public, b"\0" + rs, MESSAGE) is False
    # The same (r, s) written one byte wider each is the wrong length: rejected.
    wide = r.to_bytes(q_bytes + 1, "big") + s.to_bytes(q_bytes + 1, "big")
    assert verify("DS256", public, wide, MESSAGE) is False
    assert encode_dss_signature(r, s) == der
    assert verify("DS256", public, b"\0" * (2 * q_bytes), MESSAGE) is False


def test_es256_rejects_der(keys: dict[Alg, PrivateKey]) -> None:
    key = keys["ES256"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
    assert verify("ES256", key.public_key(), der, MESSAGE) is False
    assert verify("ES256", key.public_key(), sign("ES256", key, MESSAGE), MESSAGE) is True


# --- Cross-alg: a key or signature of one alg never passes as another -------------------------


@pytest.mark.parametrize("signed_as", ALGS)
@pytest.mark.parametrize("checked_as", ALGS)
def test_cross_alg_fails_without_exception(
    keys: dict[Alg, PrivateKey], signed_as: Alg, checked_as: Alg
) -> None:
    key = keys[signed_as]
    signature = sign(signed_as, key, MESSAGE)
    # EdDSA and Ed25519 are one scheme: which one a key may sign is decided by the
    # registration (alg_mismatch), not by verify().
    expected = signed_as == checked_as or {signed_as, checked_as} <= ED25519_ALGS
    assert verify(checked_as, key.public_key(), signature, MESSAGE) is expected


@pytest.mark.parametrize("signature", [b"", b"\0" * 64, b"\xff" * 64, b"\xff" * 256])
@pytest.mark.parametrize("alg", ALGS)
def test_junk_signatures_are_false(keys: dict[Alg, PrivateKey], alg: Alg, signature: bytes) -> None:
    assert verify(alg, keys[alg].public_key(), signature, MESSAGE) is False


def test_es256_key_for_eddsa_is_false(rfc7515_ec_key: ec.EllipticCurvePublicKey) -> None:
    assert verify("EdDSA", rfc7515_ec_key, A4_SIG, A4_INPUT) is False
    assert verify("EdDSA", rfc7515_ec_key, A3_SIG, A3_INPUT) is False


def test_sign_with_wrong_key_type_raises(keys: dict[Alg, PrivateKey]) -> None:
    with pytest.raises(KeyFileError, match="cannot sign EdDSA"):
        sign("EdDSA", keys["ES256"], MESSAGE)
    with pytest.raises(KeyFileError, match="cannot sign DS256"):
        sign("DS256", keys["RS256"], MESSAGE)


def test_unknown_alg_is_false(keys: dict[Alg, PrivateKey]) -> None:
    signature = sign("DS256", keys["DS256"], MESSAGE)
    bogus = cast("Alg", "none")
    assert verify(bogus, keys["DS256"].public_key(), signature, MESSAGE) is False


def test_es256_verify_rejects_other_256_bit_curves() -> None:
    k1 = ec.generate_private_key(ec.SECP256K1())
    r, s = decode_dss_signature(k1.sign(MESSAGE, ec.ECDSA(hashes.SHA256())))
    rs = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert verify("ES256", k1.public_key(), rs, MESSAGE) is False


# --- b64url_decode: strict base64url, no padding -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", b""),
        ("QQ", b"A"),
        ("QUI", b"AB"),
        ("QUJD", b"ABC"),
        ("-_8", b"\xfb\xff"),
        (b"QUJD", b"ABC"),
        (RFC8037_A4_PAYLOAD, b"Example of Ed25519 signing"),
    ],
)
def test_b64url_decode_accepts(text: str | bytes, expected: bytes) -> None:
    assert b64url_decode(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "QQ==",  # padding
        "QUI=",
        "=",
        "+_8",  # standard-alphabet characters
        "-/8",
        "QU JD",  # whitespace, anywhere
        " QUJD",
        "QUJD\n",
        "QUJD\t",
        "Q",  # length % 4 == 1 is never valid
        "QUJDR",
        "QR",  # non-canonical: the last character carries stray bits
        "QUJ",
        "QUJEQUL",  # stray bits after a full group too
        "QUJ.",  # other punctuation
        "QUJ\x00",
        "QUJé",  # non-ASCII
        b"QUJ\xc3",
    ],
)
def test_b64url_decode_rejects(text: str | bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        b64url_decode(text)


@pytest.mark.parametrize("data", [b"", b"\0", b"\xff\xfe", b"abc", bytes(range(256))])
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data


# --- Key loading and checks ---------------------------------------------------------------------


def _pem(key: PublicKey) -> bytes:
    return public_key_pem(key)


@pytest.mark.parametrize("alg", ALGS)
def test_load_public_key_round_trip(keys: dict[Alg, PrivateKey], alg: Alg) -> None:
    public = keys[alg].public_key()
    loaded = load_public_key(_pem(public), alg)
    assert _pem(loaded) == _pem(public)
    check_key_for_alg(loaded, alg)
    signature = sign(alg, keys[alg], MESSAGE)
    assert verify(alg, loaded, signature, MESSAGE) is True


@pytest.mark.parametrize("alg", ALGS)
def test_load_private_key_round_trip(keys: dict[Alg, PrivateKey], alg: Alg) -> None:
    loaded = load_private_key(private_key_pem(keys[alg]))
    assert _pem(loaded.public_key()) == _pem(keys[alg].public_key())


@pytest.fixture(scope="module")
def rsa_1024() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()


@pytest.fixture(scope="module")
def dsa_1024() -> dsa.DSAPublicKey:
    return dsa.generate_private_key(key_size=1024).public_key()


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_rsa_1024_rejected(rsa_1024: rsa.RSAPublicKey, alg: Alg) -> None:
    with pytest.raises(KeyFileError, match="2048"):
        load_public_key(_pem(rsa_1024), alg)
    with pytest.raises(KeyFileError, match="2048"):
        check_key_for_alg(rsa_1024, alg)


def test_dsa_1024_rejected(dsa_1024: dsa.DSAPublicKey) -> None:
    with pytest.raises(KeyFileError, match="2048"):
        load_public_key(_pem(dsa_1024), "DS256")


def test_ec_p384_rejected_for_es256() -> None:
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(KeyFileError, match="P-256"):
        load_public_key(_pem(public), "ES256")


def test_ec_secp256k1_rejected_for_es256() -> None:
    public = ec.generate_private_key(ec.SECP256K1()).public_key()
    with pytest.raises(KeyFileError, match="P-256"):
        load_public_key(_pem(public), "ES256")


@pytest.mark.parametrize(
    ("key_alg", "wanted"),
    [
        ("EdDSA", "RS256"),
        ("ES256", "PS256"),
        ("RS256", "ES256"),
        ("DS256", "EdDSA"),
        ("EdDSA", "DS256"),
    ],
)
def test_key_of_another_type_rejected(keys: dict[Alg, PrivateKey], key_alg: Alg, wanted: Alg) -> None:
    with pytest.raises(KeyFileError, match=wanted):
        load_public_key(_pem(keys[key_alg].public_key()), wanted)


def test_unsupported_key_type_rejected() -> None:
    public = x25519.X25519PrivateKey.generate().public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(KeyFileError, match="unsupported key type"):
        load_public_key(pem, "EdDSA")


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a key",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        b"-----BEGIN PUBLIC KEY-----\n\xff\xfe\n-----END PUBLIC KEY-----\n",
    ],
)
def test_garbage_public_pem_rejected(pem: bytes) -> None:
    with pytest.raises(KeyFileError, match="not a PEM-encoded public key"):
        load_public_key(pem, "RS256")


def test_private_pem_is_not_a_public_key(keys: dict[Alg, PrivateKey]) -> None:
    with pytest.raises(KeyFileError, match="not a PEM-encoded public key"):
        load_public_key(private_key_pem(keys["EdDSA"]), "EdDSA")


def test_garbage_and_encrypted_private_pem_rejected(keys: dict[Alg, PrivateKey]) -> None:
    with pytest.raises(KeyFileError, match="not an unencrypted PEM-encoded private key"):
        load_private_key(b"garbage")
    encrypted = keys["EdDSA"].private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(KeyFileError, match="not an unencrypted PEM-encoded private key"):
        load_private_key(encrypted)


def test_is_alg() -> None:
    assert all(is_alg(alg) for alg in ALGS)
    assert not is_alg("none")
    assert not is_alg("HS256")
    assert not is_alg("rs256")
    assert not is_alg(None)
    assert set(ALGS) == {"RS256", "PS256", "ES256", "EdDSA", "Ed25519", "DS256"}


# --- Signer: flattened JSON JWS -----------------------------------------------------------------


def _jws_parts(raw: bytes) -> Iterator[str]:
    jws = orjson.loads(raw)
    assert isinstance(jws, dict)
    assert set(jws) == {"protected", "payload", "signature"}
    for name in ("protected", "payload", "signature"):
        value = jws[name]
        assert isinstance(value, str)
        yield value


@pytest.mark.parametrize("alg", ALGS)
def test_signer_produces_flattened_jws(keys: dict[Alg, PrivateKey], alg: Alg) -> None:
    body = b'{"a":1}'
    signer = Signer(alg, "meter-0001/k1", keys[alg])
    protected, payload, signature = _jws_parts(signer.sign_body(body))
    assert orjson.loads(b64url_decode(protected)) == {"alg": alg, "kid": "meter-0001/k1"}
    assert protected == signer.protected()
    assert b64url_decode(payload) == body
    signing_input = _signing_input(protected, payload)
    assert verify(alg, keys[alg].public_key(), b64url_decode(signature), signing_input) is True
    # The signature covers the protected header: another header does not verify.
    other = b64url_encode(orjson.dumps({"alg": alg, "kid": "meter-0002/k1"}))
    assert (
        verify(alg, keys[alg].public_key(), b64url_decode(signature), _signing_input(other, payload)) is False
    )


def test_signer_reuses_a_given_protected_header(keys: dict[Alg, PrivateKey]) -> None:
    signer = Signer("EdDSA", "k", keys["EdDSA"])
    protected = signer.protected()
    protected_out, _, _ = _jws_parts(signer.sign_body(b"{}", protected=protected))
    assert protected_out == protected


def test_signer_rejects_unsuitable_keys(keys: dict[Alg, PrivateKey]) -> None:
    with pytest.raises(KeyFileError, match="RS256 needs an RSA key"):
        Signer("RS256", "k", keys["EdDSA"])
    with pytest.raises(KeyFileError, match="P-256"):
        Signer("ES256", "k", ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(KeyFileError, match="2048"):
        Signer("PS256", "k", rsa.generate_private_key(public_exponent=65537, key_size=1024))
