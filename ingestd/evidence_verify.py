#!/usr/bin/env python3
"""Check an ingestd evidence bundle, offline, with no ingestd and no database.

    python3 verify.py [BUNDLE_DIR]        (default: the directory this file is in)

Needs Python 3.11 or newer and the ``cryptography`` package, nothing else. It checks:
1. ``manifest.json`` against ``manifest.json.sha256``, and every file the manifest lists
   against its SHA-256;
2. every signed message (``messages/*.jws``, JWS flattened JSON, byte for byte as the
   meter sent it) against the public key its header names (``keys/*.pem``), with the
   algorithm that key is registered for (RS256, PS256, ES256, EdDSA or Ed25519, DS256), and that
   the key was valid when the message was received;
3. that the boundary readings the manifest names are in those signed messages, with
   those values; an interpolated boundary is recomputed from the two signed readings
   around it, and no signed reading may lie between them;
4. the consumption (close minus open) against the manifest, and against the statement
   (``statement.json``) when the bundle has one.
Exit status 0 when everything holds, 1 when anything does not (each failure printed).

This file is part of the bundle (its digest is in the manifest); it is kept short so that
it can be read before it is trusted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

_P256_BYTES = 32


def b64url(text: str) -> bytes:
    """Strict base64url without padding (as JWS requires)."""
    if "=" in text or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    try:
        return base64.b64decode(
            text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
        )
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


def parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"time without an offset: {text}")
    return value


def interpolate(t0: datetime, wh0: int, t1: datetime, wh1: int, at: datetime) -> int:
    """The register at ``at``, on the straight line between two readings, to the nearest
    Wh (a half to the even Wh)."""
    us = Fraction((at - t0) // timedelta(microseconds=1), (t1 - t0) // timedelta(microseconds=1))
    return round(wh0 + (wh1 - wh0) * us)


def verify_signature(alg: str, key: Any, signature: bytes, signing_input: bytes) -> bool:  # noqa: ANN401 - any public key
    sha256 = hashes.SHA256()
    try:
        if alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(key.curve, ec.SECP256R1) or len(signature) != 2 * _P256_BYTES:
                return False
            r, s = (int.from_bytes(signature[i : i + _P256_BYTES], "big") for i in (0, _P256_BYTES))
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(sha256))
        elif alg in {"EdDSA", "Ed25519"} and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signing_input)
        elif alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, padding.PKCS1v15(), sha256)
        elif alg == "PS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(
                signature, signing_input, padding.PSS(mgf=padding.MGF1(sha256), salt_length=32), sha256
            )
        elif alg == "DS256" and isinstance(key, dsa.DSAPublicKey):
            # DS256 (not a registered JOSE algorithm): DSA with SHA-256, the signature r||s,
            # each as wide as the key's q.
            width = (key.parameters().parameter_numbers().q.bit_length() + 7) // 8
            if len(signature) != 2 * width:
                return False
            r, s = (int.from_bytes(signature[i : i + width], "big") for i in (0, width))
            key.verify(encode_dss_signature(r, s), signing_input, sha256)
        else:
            return False
    except InvalidSignature:
        return False
    return True


class Check:
    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.failures: list[str] = []

    def fail(self, text: str) -> None:
        self.failures.append(text)
        print(f"FAIL  {text}")

    def run(self) -> bool:
        manifest_bytes = (self.bundle / "manifest.json").read_bytes()
        # sha256sum's format, exactly: a byte changed anywhere in it is a failure.
        expected = f"{hashlib.sha256(manifest_bytes).hexdigest()}  manifest.json\n".encode()
        if (self.bundle / "manifest.json.sha256").read_bytes() != expected:
            self.fail("manifest.json does not match manifest.json.sha256")
            return False
        manifest = json.loads(manifest_bytes)
        for name, entry in sorted(manifest["files"].items()):
            path = self.bundle / name
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                self.fail(f"{name}: missing, or not the file the manifest lists (SHA-256 differs)")
        print(f"ok    {len(manifest['files'])} files match their SHA-256 in manifest.json")
        readings = self.messages(manifest)
        self.figures(manifest, readings)
        return not self.failures

    def messages(self, manifest: dict[str, Any]) -> dict[tuple[int, int], dict[datetime, int]]:
        """Verify every message; return each one's signed readings by (epoch, seq)."""
        keys = {k["kid"]: k for k in manifest["keys"]}
        signed: dict[tuple[int, int], dict[datetime, int]] = {}
        for entry in manifest["messages"]:
            name = entry["file"]
            try:
                envelope = json.loads((self.bundle / name).read_bytes())
                header = json.loads(b64url(envelope["protected"]))
                body = json.loads(b64url(envelope["payload"]))
                signature = b64url(envelope["signature"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.fail(f"{name}: not a signed message ({exc})")
                continue
            key = keys.get(header.get("kid"))
            if key is None:
                self.fail(f"{name}: its key {header.get('kid')!r} is not in the bundle")
                continue
            public = serialization.load_pem_public_key((self.bundle / key["file"]).read_bytes())
            signing_input = f"{envelope['protected']}.{envelope['payload']}".encode("ascii")
            if header.get("alg") != key["alg"] or not verify_signature(
                key["alg"], public, signature, signing_input
            ):
                self.fail(f"{name}: the signature does not verify with key {key['kid']} ({key['alg']})")
                continue
            received = parse_time(entry["received_at"])
            valid = (
                parse_time(key["valid_from"]) <= received
                and (key["valid_until"] is None or received < parse_time(key["valid_until"]))
                and (key["revoked_at"] is None or received < parse_time(key["revoked_at"]))
            )
            if not valid:
                self.fail(
                    f"{name}: key {key['kid']} was not valid when the message was received ({received})"
                )
            if (body.get("meter"), body.get("epoch"), body.get("seq")) != (
                manifest["meter_id"],
                entry["epoch"],
                entry["seq"],
            ):
                self.fail(
                    f"{name}: signed for meter {body.get('meter')} "
                    f"epoch {body.get('epoch')} seq {body.get('seq')}"
                )
                continue
            signed[(entry["epoch"], entry["seq"])] = {
                parse_time(r["t"]): r["import_wh"] for r in body.get("readings", [])
            }
        print(f"ok    {len(signed)} of {len(manifest['messages'])} signed messages verify")
        return signed

    def figures(self, manifest: dict[str, Any], signed: dict[tuple[int, int], dict[datetime, int]]) -> None:
        values: dict[str, int | None] = {}
        every_time = sorted({t for readings in signed.values() for t in readings})
        for side in ("open", "close"):
            boundary = manifest["boundaries"][side]
            at = parse_time(boundary["time"])
            named = []
            for r in boundary["readings"]:
                value = signed.get((r["epoch"], r["seq"]), {}).get(parse_time(r["time"]))
                if value != r["import_wh"]:
                    self.fail(
                        f"{side}: no signed reading of {r['import_wh']} Wh at {r['time']} in {r['message']}"
                    )
                named.append((parse_time(r["time"]), r["import_wh"]))
            if boundary["method"] == "read":
                value = named[0][1] if len(named) == 1 and named[0][0] == at else None
            elif boundary["method"] == "interpolated" and len(named) == 2:
                (t0, wh0), (t1, wh1) = sorted(named)
                if any(t0 < t < t1 for t in every_time):
                    self.fail(
                        f"{side}: a signed reading lies between {t0} and {t1}: it should have been used"
                    )
                value = interpolate(t0, wh0, t1, wh1, at) if t0 < at < t1 else None
            else:
                value = None
            if value != boundary["import_wh"]:
                self.fail(
                    f"{side}: {boundary['method']} register at {boundary['time']} is {value}, "
                    f"manifest says {boundary['import_wh']}"
                )
            else:
                print(f"ok    {side} {boundary['time']}: {value} Wh ({boundary['method']})")
            values[side] = value
        opened, closed = values["open"], values["close"]
        consumption = closed - opened if opened is not None and closed is not None else None
        claims = {"manifest": manifest["consumption_wh"]}
        statement = self.bundle / "statement.json"
        if statement.is_file():
            claims["statement"] = json.loads(statement.read_bytes()).get("consumption_wh")
        for source, claimed in claims.items():
            if claimed != consumption:
                self.fail(
                    f"consumption recomputed from the signed readings is {consumption} Wh, "
                    f"{source} says {claimed}"
                )
            else:
                print(f"ok    consumption {consumption} Wh, as the {source} says")


def main() -> int:
    bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    try:
        ok = Check(bundle).run()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"FAIL  the bundle cannot be read: {exc!r}")
        ok = False
    print("bundle verifies" if ok else "bundle does NOT verify")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
