-- Keys may be registered for Ed25519 under its fully specified JOSE name, `Ed25519`
-- (RFC 9864), as well as the deprecated `EdDSA`: meters' JOSE libraries write one or the
-- other in the header, and the header's alg must equal the registered one. Safe to run twice.

ALTER TABLE meter_keys DROP CONSTRAINT IF EXISTS meter_keys_alg_check;
ALTER TABLE meter_keys ADD CONSTRAINT meter_keys_alg_check
    CHECK (alg IN ('RS256', 'PS256', 'ES256', 'EdDSA', 'Ed25519', 'DS256'));
