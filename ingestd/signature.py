"""JWS signatures (RFC 7515, flattened JSON serialization) for the meter algorithms.

Signatures travel in JWS form: ECDSA and DSA as the fixed-width concatenation r||s,
not DER. Keys are checked when they are loaded, so that a weak key never gets as far
as the key table. ``EdDSA`` and ``Ed25519`` are one scheme under two names: RFC 9864
deprecates the first, which fixes no curve, in favour of the second, and meters'
libraries speak one or the other.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Final, Literal, TypeGuard, get_args

import orjson
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
)

from ingestd.errors import KeyFileError

Alg = Literal["RS256", "PS256", "ES256", "EdDSA", "Ed25519", "DS256"]
ALGS: Final[tuple[Alg, ...]] = get_args(Alg)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | dsa.DSAPublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | dsa.DSAPrivateKey

# The two names of Ed25519 signatures (RFC 8037 and RFC 9864).
ED25519_ALGS: Final = frozenset({"EdDSA", "Ed25519"})

MIN_RSA_BITS: Final = 2048
MIN_DSA_BITS: Final = 2048
_PSS_SALT: Final = 32
_P256_BYTES: Final = 32
_B64URL_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_TO_STD: Final = bytes.maketrans(b"-_+/=", b"+/!!!")
_B64URL_VALUE: Final = {c: i for i, c in enumerate(_B64URL_ALPHABET)}
_PADDING: Final = (b"", b"", b"==", b"=")
# By length mod 4: the low bits of the last character that hold no data.
_STRAY_BITS: Final = (0, 0, 0x0F, 0x03)
_SHA256 = hashes.SHA256()
# Immutable and thread-safe: one for every ES256 verification rather than one per call.
_ECDSA_SHA256: Final = ec.ECDSA(_SHA256)


def is_alg(value: object) -> TypeGuard[Alg]:
    return isinstance(value, str) and value in ALGS


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    """Strict base64url without padding: anything else raises ValueError."""
    try:
        raw = text.encode("ascii", "strict") if isinstance(text, str) else text
    except UnicodeEncodeError:
        raise ValueError("it has a character outside A-Z a-z 0-9 - _ (non-ASCII)") from None
    # The stdlib decoder skips stray characters; JWS must not (two encodings of one
    # payload would let an attacker vary the bytes we store under one signature).
    # Three per message: this is the fast equivalent of a pattern match, decoding and
    # re-encoding to compare. "+", "/" and "=" become "!", which strict mode refuses,
    # as it refuses anything else outside the alphabet.
    size = len(raw)
    if size % 4 == 1:
        raise ValueError("its length is 1 more than a multiple of 4, which no encoding has")
    try:
        decoded = binascii.a2b_base64(raw.translate(_B64URL_TO_STD) + _PADDING[size % 4], strict_mode=True)
    except binascii.Error:
        raise ValueError(
            "it has a character outside A-Z a-z 0-9 - _ (no padding, white space or + /)"
        ) from None
    # Canonical: the bits of the last character that carry no data must be zero.
    if size % 4 and _B64URL_VALUE[raw[-1]] & _STRAY_BITS[size % 4]:
        raise ValueError("its last character has non-zero unused bits (not canonical)")
    return decoded


def verify(alg: Alg, key: PublicKey, signature: bytes, signing_input: bytes) -> bool:
    """True when ``signature`` is ``alg``'s signature of ``signing_input`` under ``key``.

    The caller has already matched ``alg`` to the algorithm the key was registered with;
    a key of another type simply fails here.
    """
    try:
        if alg == "ES256":
            if (
                not isinstance(key, ec.EllipticCurvePublicKey)
                or not isinstance(key.curve, ec.SECP256R1)
                or len(signature) != 2 * _P256_BYTES
            ):
                return False
            der = _rs_to_der(signature, _P256_BYTES)
            key.verify(der, signing_input, _ECDSA_SHA256)
        elif alg in ED25519_ALGS:
            if not isinstance(key, ed25519.Ed25519PublicKey):
                return False
            key.verify(signature, signing_input)
        elif alg == "RS256":
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            key.verify(signature, signing_input, padding.PKCS1v15(), _SHA256)
        elif alg == "PS256":
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            pss = padding.PSS(mgf=padding.MGF1(_SHA256), salt_length=_PSS_SALT)
            key.verify(signature, signing_input, pss, _SHA256)
        elif alg == "DS256":
            if not isinstance(key, dsa.DSAPublicKey):
                return False
            width = _dsa_width(key)
            if len(signature) != 2 * width:
                return False
            key.verify(_rs_to_der(signature, width), signing_input, _SHA256)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def sign(alg: Alg, key: PrivateKey, signing_input: bytes) -> bytes:
    """The JWS signature of ``signing_input`` (r||s for ECDSA and DSA)."""
    if alg == "ES256" and isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(_SHA256)))
        return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
    if alg in ED25519_ALGS and isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(signing_input)
    if alg == "RS256" and isinstance(key, rsa.RSAPrivateKey):
        return key.sign(signing_input, padding.PKCS1v15(), _SHA256)
    if alg == "PS256" and isinstance(key, rsa.RSAPrivateKey):
        pss = padding.PSS(mgf=padding.MGF1(_SHA256), salt_length=_PSS_SALT)
        return key.sign(signing_input, pss, _SHA256)
    if alg == "DS256" and isinstance(key, dsa.DSAPrivateKey):
        width = _dsa_width(key.public_key())
        r, s = decode_dss_signature(key.sign(signing_input, _SHA256))
        return r.to_bytes(width, "big") + s.to_bytes(width, "big")
    raise KeyFileError(f"a {_key_kind(key)} key cannot sign {alg}")


@dataclass(frozen=True, slots=True)
class Signer:
    """Makes flattened-JSON JWS messages: used by meters (the simulator) and the head-end."""

    alg: Alg
    kid: str
    key: PrivateKey

    def __post_init__(self) -> None:
        check_key_for_alg(self.key.public_key(), self.alg)

    def protected(self) -> str:
        return b64url_encode(orjson.dumps({"alg": self.alg, "kid": self.kid}))

    def sign_body(self, body: bytes, protected: str | None = None) -> bytes:
        """A complete JWS (flattened JSON) carrying ``body``; pass ``protected`` to reuse it."""
        protected = protected if protected is not None else self.protected()
        payload = b64url_encode(body)
        signature = sign(self.alg, self.key, f"{protected}.{payload}".encode("ascii"))
        return orjson.dumps(
            {"protected": protected, "payload": payload, "signature": b64url_encode(signature)}
        )


def alg_for_key(key: PrivateKey) -> Alg:
    """The algorithm a key of ours signs with (RSA: PSS, the modern of the two)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        return "PS256"
    return "DS256"


def generate_private_key(alg: Alg) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg in ED25519_ALGS:
        return ed25519.Ed25519PrivateKey.generate()
    if alg in {"RS256", "PS256"}:
        return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    return dsa.generate_private_key(key_size=MIN_DSA_BITS)


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(pem: bytes, alg: Alg) -> PublicKey:
    """Parse a SubjectPublicKeyInfo PEM and check it suits ``alg``; KeyFileError otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError("not a PEM-encoded public key (SubjectPublicKeyInfo)") from None
    if not isinstance(
        key,
        rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | dsa.DSAPublicKey,
    ):
        raise KeyFileError(f"unsupported key type {type(key).__name__}")
    check_key_for_alg(key, alg)
    return key


def load_private_key(pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError("not an unencrypted PEM-encoded private key (PKCS#8)") from None
    if not isinstance(
        key,
        rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | dsa.DSAPrivateKey,
    ):
        raise KeyFileError(f"unsupported key type {type(key).__name__}")
    return key


def check_key_for_alg(key: PublicKey, alg: Alg) -> None:
    """Raise KeyFileError unless ``key`` is of the type and strength ``alg`` needs."""
    if alg in {"RS256", "PS256"}:
        if not isinstance(key, rsa.RSAPublicKey):
            raise KeyFileError(f"{alg} needs an RSA key, got {_key_kind(key)}")
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"RSA key of {key.key_size} bits: {alg} needs at least {MIN_RSA_BITS}")
    elif alg == "ES256":
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise KeyFileError(f"ES256 needs an EC P-256 key, got {_key_kind(key)}")
    elif alg in ED25519_ALGS:
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise KeyFileError(f"{alg} needs an Ed25519 key, got {_key_kind(key)}")
    elif alg == "DS256":
        if not isinstance(key, dsa.DSAPublicKey):
            raise KeyFileError(f"DS256 needs a DSA key, got {_key_kind(key)}")
        if key.key_size < MIN_DSA_BITS:
            raise KeyFileError(f"DSA key of {key.key_size} bits: DS256 needs at least {MIN_DSA_BITS}")
    else:  # pragma: no cover - Alg is closed
        raise KeyFileError(f"unknown alg {alg!r}")


def _rs_to_der(signature: bytes, width: int) -> bytes:
    """DER ``SEQUENCE { INTEGER r, INTEGER s }`` from JWS r||s, straight from the bytes:
    what ``encode_dss_signature`` makes, without the round trip through Python ints."""
    body = _der_integer(signature[:width]) + _der_integer(signature[width:])
    return b"\x30" + _der_length(len(body)) + body


def _der_integer(magnitude: bytes) -> bytes:
    # Minimal big-endian two's complement of a non-negative number.
    value = magnitude.lstrip(b"\x00") or b"\x00"
    if value[0] & 0x80:
        value = b"\x00" + value
    return b"\x02" + _der_length(len(value)) + value


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def _dsa_width(key: dsa.DSAPublicKey) -> int:
    return (key.parameters().parameter_numbers().q.bit_length() + 7) // 8


def _key_kind(key: PublicKey | PrivateKey) -> str:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    if isinstance(key, dsa.DSAPublicKey | dsa.DSAPrivateKey):
        return f"DSA-{key.key_size}"
    return "Ed25519"
