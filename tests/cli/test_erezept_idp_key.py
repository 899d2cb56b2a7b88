"""`safehold erezept …` mints its development access tokens with the IdP key `safehold up` made
in the owner directory and the stack's fixed issuer — never with a key file or issuer that the
operator's `up.json` names (found by the operator-attack review of 8 Dec 2026: a planted key
only yields tokens the VAU refuses, but no path from up.json may be used)."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey

from safehold.cli.erezept import _Ctx
from safehold.devstack.services import IDP_ISSUER, idp_key


def test_the_token_is_signed_by_the_owner_dirs_idp_key_not_up_jsons(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    monkeypatch.delenv("SAFEHOLD_EREZEPT_TOKEN", raising=False)
    d, owner = tmp_path / "data", tmp_path / "data.owner"
    d.mkdir()
    owner.mkdir(mode=0o700)
    real = idp_key(owner)
    planted = tmp_path / "operator.key"
    planted.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (d / "up.json").write_text(json.dumps({"erezept": {
        "url": "https://127.0.0.1:9", "policy": str(d / "vau-policy.toml"),
        "idp_key": str(planted), "idp_issuer": "https://operator.example"}}))
    tok = _Ctx(str(d), None, str(tmp_path / "my-policy.toml")).token("prescriber", "1-838382202")
    pub = ECKey.import_key(real.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    claims = jwt.decode(tok, pub, algorithms=["ES256"]).claims  # raises unless the owner's key signed
    assert claims["iss"] == IDP_ISSUER and claims["idNummer"] == "1-838382202"
