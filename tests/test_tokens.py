"""Auth token providers (``--auth-token``): simple tokens and JWTs, on a
fake clock.  Keys are generated for the test module; the expected claims,
headers and errors are etcd 3.6's (``server/auth/simple_token.go``,
``jwt.go``, ``options.go``, ``store.go``)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import re
import threading
import time

import grpc
import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from harness import FAST_ELECTION, EtcdProcess
from mvcckv import errors
from mvcckv.pb import rpc_pb2 as pb
from mvcckv.pb import rpc_pb2_grpc
from mvcckv.server import tokens
from mvcckv.server.tokens import (
    InvalidAuthMethodError,
    InvalidAuthOptsError,
    JWTTokenProvider,
    KeyFormatError,
    KeyMismatchError,
    MissingKeyError,
    NopTokenProvider,
    SimpleTokenProvider,
    VerifyOnlyError,
    token_provider,
)

NOW = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def simple(ttl: int = 300, clock: FakeClock | None = None) -> tuple[SimpleTokenProvider, FakeClock]:
    clock = clock or FakeClock()
    provider = token_provider("simple", ttl, clock)
    provider.enable()
    return provider, clock


# --- simple tokens ---------------------------------------------------------------


def test_simple_token_format_and_identity():
    provider, _ = simple()
    issued = [provider.assign(user, 4) for user in ("alice", "bob", "alice")]
    for token in issued:
        assert re.fullmatch(r"[A-Za-z]{16}\.[0-9]+", token), token
    assert [int(t.split(".")[1]) for t in issued] == [1, 2, 3]
    assert len({t.split(".")[0] for t in issued}) == 3
    # The revision reported is the store's current one, not the one at assign.
    assert provider.info(issued[0], 9) == tokens.AuthInfo("alice", 9)
    assert provider.info(issued[1], 9).username == "bob"
    assert provider.info(issued[1], 9).revision == 9


@pytest.mark.parametrize(
    "ttl, steps",
    [
        # (seconds since the previous step, still valid?)
        (10, [(9, True), (9, True), (9, True), (10, True)]),  # each use refreshes
        (10, [(10, True)]),  # valid up to and including the deadline
        (10, [(10.001, False)]),
        (10, [(5, True), (10.5, False), (0, False)]),  # gone for good once expired
        (0, [(299, True), (300, True), (300.5, False)]),  # 0 means etcd's default, 300 s
        (3600, [(3599, True), (3601, False)]),
    ],
    ids=["refresh", "deadline", "idle", "stays-expired", "default-ttl", "long-ttl"],
)
def test_simple_token_ttl(ttl, steps):
    provider, clock = simple(ttl)
    token = provider.assign("alice", 1)
    for elapsed, valid in steps:
        clock.now += elapsed
        assert (provider.info(token, 1) is not None) == valid, (clock.now - NOW, steps)


def test_simple_token_expired_is_forgotten():
    provider, clock = simple(10)
    token = provider.assign("alice", 1)
    clock.now += 11
    assert len(provider) == 1
    assert provider.info(token, 1) is None
    assert len(provider) == 0


@pytest.mark.parametrize(
    "token",
    ["", "nonsense", "abcdefghijklmnop", "abcdefghijklmnop.1", ".1", "a.b.c", "x" * 10_000],
)
def test_simple_token_unknown(token):
    provider, _ = simple()
    provider.assign("alice", 1)
    assert provider.info(token, 1) is None


def test_abandoned_simple_tokens_are_swept():
    provider, clock = simple(ttl=5)
    high = 0
    for _ in range(20 * tokens._SWEEP_MIN):
        provider.assign("alice", 1)
        clock.now += 0.01  # ~500 tokens live at a time
        high = max(high, len(provider))
    assert high <= tokens._SWEEP_MIN
    # Live tokens are never swept, however many there are.
    live = [provider.assign("bob", 1) for _ in range(3 * tokens._SWEEP_MIN)]
    assert all(provider.info(t, 1) is not None for t in live)


def test_invalidate_user():
    provider, _ = simple()
    alice = [provider.assign("alice", 1) for _ in range(3)]
    bob = provider.assign("bob", 1)
    provider.invalidate_user("alice")
    assert [provider.info(t, 2) for t in alice] == [None, None, None]
    assert provider.info(bob, 2) == tokens.AuthInfo("bob", 2)
    provider.invalidate_user("nobody")
    assert provider.info(bob, 2) is not None
    assert provider.info(provider.assign("alice", 2), 2).username == "alice"


def test_disable_drops_every_token():
    provider = SimpleTokenProvider(300, FakeClock())
    before_enable = provider.assign("alice", 1)
    provider.enable()
    assert provider.info(before_enable, 1) is None
    issued = [provider.assign(user, 1) for user in ("alice", "bob")]
    provider.disable()
    assert [provider.info(t, 1) for t in issued] == [None, None]
    # Issued while auth is off (a race with AuthDisable): never valid.
    while_disabled = provider.assign("alice", 1)
    provider.enable()
    assert provider.info(while_disabled, 1) is None
    assert [provider.info(t, 1) for t in issued] == [None, None]
    again = provider.assign("alice", 1)
    assert provider.info(again, 1) is not None
    provider.close()
    assert provider.info(again, 1) is None


def test_simple_tokens_from_many_threads():
    provider, clock = simple()
    threads, per_thread = 8, 200
    issued: list[list[str]] = [[] for _ in range(threads)]
    failures: list[str] = []
    start = threading.Barrier(threads + 1)

    def work(n: int) -> None:
        user = f"user{n}"
        start.wait()
        for i in range(per_thread):
            token = provider.assign(user, 1)
            issued[n].append(token)
            info = provider.info(issued[n][i // 2], 1)
            if info is None or info.username != user:
                failures.append(token)

    def churn() -> None:
        start.wait()
        for _ in range(per_thread):
            provider.invalidate_user("somebody else")
            clock.now += 0.001

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    workers.append(threading.Thread(target=churn))
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=30)
        assert not t.is_alive()
    assert failures == []
    every = [t for ts in issued for t in ts]
    assert len(set(every)) == threads * per_thread
    assert sorted(int(t.split(".")[1]) for t in every) == list(range(1, threads * per_thread + 1))
    assert all(provider.info(t, 1) is not None for t in every)


# --- keys ------------------------------------------------------------------------


def _pem_private(key, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _pem_public(key, fmt=serialization.PublicFormat.SubjectPublicKeyInfo) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, fmt)


def _certificate(key) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etcd")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1)).sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Key files by name; ``*.priv`` / ``*.pub`` pairs and some odd ones."""
    directory = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    generated = {
        "rsa": rsa_key,
        "rsa-other": other_rsa,
        "ec256": ec.generate_private_key(ec.SECP256R1()),
        "ec256-other": ec.generate_private_key(ec.SECP256R1()),
        "ec384": ec.generate_private_key(ec.SECP384R1()),
        "ec521": ec.generate_private_key(ec.SECP521R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "ed-other": ed25519.Ed25519PrivateKey.generate(),
    }
    contents = {}
    for name, key in generated.items():
        contents[f"{name}.priv"] = _pem_private(key)
        contents[f"{name}.pub"] = _pem_public(key)
    contents["rsa-pkcs1.priv"] = _pem_private(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL)
    contents["rsa-pkcs1.pub"] = _pem_public(rsa_key, serialization.PublicFormat.PKCS1)
    contents["rsa-cert.pub"] = _certificate(rsa_key)
    contents["rsa-encrypted.priv"] = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    contents["ec256-sec1.priv"] = _pem_private(generated["ec256"], serialization.PrivateFormat.TraditionalOpenSSL)
    # What `openssl ecparam -genkey` writes: golang-jwt reads only the first block.
    contents["ec256-with-params.priv"] = (
        b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
        + contents["ec256-sec1.priv"])
    contents["hmac.priv"] = b"a shared secret of 64 bytes or more, read raw; not a PEM file at all\n"
    contents["garbage"] = b"this is not a key\n"
    contents["empty"] = b""
    paths = {}
    for name, data in contents.items():
        path = directory / name
        path.write_bytes(data)
        paths[name] = str(path)
    paths["missing"] = str(directory / "missing")
    paths["_objects"] = generated
    return paths


def jwt_provider(keys, method, *, pub=None, priv=None, ttl="", clock=None) -> JWTTokenProvider:
    option = f"jwt,sign-method={method}"
    if pub:
        option += f",pub-key={keys[pub]}"
    if priv:
        option += f",priv-key={keys[priv]}"
    if ttl:
        option += f",ttl={ttl}"
    return token_provider(option, 300, clock or FakeClock())


# (signing method, key pair: the ``<pair>.priv`` / ``<pair>.pub`` files)
METHODS = [
    ("RS256", "rsa"), ("RS384", "rsa"), ("RS512", "rsa"),
    ("PS256", "rsa"), ("PS384", "rsa"), ("PS512", "rsa"),
    ("ES256", "ec256"), ("ES384", "ec384"), ("ES512", "ec521"),
    ("EdDSA", "ed"),
    ("HS256", "hmac"), ("HS384", "hmac"), ("HS512", "hmac"),
]


def _pyjwt_key(keys, pair):
    if pair == "hmac":
        return open(keys["hmac.priv"], "rb").read()
    return keys["_objects"][pair].public_key()


def _segments(token: str) -> list:
    """A JWT's header and claims, decoded without the code under test."""
    return [json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in token.split(".")[:2]]


# --- JWT -------------------------------------------------------------------------


@pytest.mark.parametrize("method, pair", METHODS, ids=[m for m, _ in METHODS])
def test_jwt_claims_are_etcds(keys, method, pair):
    clock = FakeClock(NOW + 0.75)
    pub = None if pair == "hmac" else f"{pair}.pub"
    provider = jwt_provider(keys, method, pub=pub, priv=f"{pair}.priv", ttl="1h", clock=clock)
    assert not provider.verify_only
    token = provider.assign("alice", 7)

    header, claims = _segments(token)
    assert header == {"alg": method, "typ": "JWT"}
    assert claims == {"username": "alice", "revision": 7, "exp": int(NOW) + 3600}
    assert token.split(".")[1] == base64.urlsafe_b64encode(
        b'{"exp":%d,"revision":7,"username":"alice"}' % (int(NOW) + 3600)).decode().rstrip("=")
    verified = pyjwt.decode(token, _pyjwt_key(keys, pair), algorithms=[method],
                            options={"verify_exp": False})
    assert verified == claims

    # A JWT reports its own revision claim, not the store's.
    assert provider.info(token, 99) == tokens.AuthInfo("alice", 7)


@pytest.mark.parametrize("method, pair", [m for m in METHODS if m[1] != "hmac"],
                         ids=[m for m, p in METHODS if p != "hmac"])
def test_jwt_verify_only(keys, method, pair):
    signer = jwt_provider(keys, method, pub=f"{pair}.pub", priv=f"{pair}.priv")
    verifier = jwt_provider(keys, method, pub=f"{pair}.pub")
    assert verifier.verify_only
    with pytest.raises(VerifyOnlyError, match="^auth: token signing attempted with verify-only key$"):
        verifier.assign("alice", 1)
    assert verifier.info(signer.assign("alice", 3), 5) == tokens.AuthInfo("alice", 3)


@pytest.mark.parametrize(
    "pub, priv",
    [
        ("rsa-pkcs1.pub", "rsa-pkcs1.priv"),  # PKCS#1 both ways
        ("rsa-cert.pub", "rsa.priv"),  # a certificate as the public key
        ("rsa-cert.pub", None),
        ("rsa.pub", "rsa-pkcs1.priv"),
    ],
)
def test_jwt_rsa_key_formats(keys, pub, priv):
    provider = jwt_provider(keys, "RS256", pub=pub, priv=priv)
    reference = jwt_provider(keys, "RS256", priv="rsa.priv")
    assert provider.info(reference.assign("alice", 1), 1) == tokens.AuthInfo("alice", 1)
    if priv:
        assert reference.info(provider.assign("bob", 2), 1) == tokens.AuthInfo("bob", 2)


def test_jwt_ec_sec1_private_key(keys):
    provider = jwt_provider(keys, "ES256", priv="ec256-sec1.priv")
    assert provider.info(provider.assign("alice", 1), 1) is not None


@pytest.mark.parametrize(
    "ttl, expected_exp",
    [("", 300), ("1h30m", 5400), ("90s", 90), ("1.5s", 1), ("500ms", 0)],
    ids=["default-5m", "1h30m", "90s", "fraction", "sub-second"],
)
def test_jwt_ttl_and_expiry(keys, ttl, expected_exp):
    clock = FakeClock(NOW + 0.25)
    provider = jwt_provider(keys, "HS256", priv="hmac.priv", ttl=ttl, clock=clock)
    token = provider.assign("alice", 1)
    exp = int(NOW) + expected_exp
    assert _segments(token)[1]["exp"] == exp
    assert (provider.info(token, 1) is not None) == (expected_exp > 0)
    # golang-jwt: valid strictly before exp.
    if expected_exp > 0:
        clock.now = exp - 0.001
        assert provider.info(token, 1) is not None
    clock.now = exp
    assert provider.info(token, 1) is None
    clock.now = exp + 3600
    assert provider.info(token, 1) is None


def test_jwt_default_clock_is_wall_time(keys):
    provider = token_provider(f"jwt,sign-method=HS256,priv-key={keys['hmac.priv']}", 300)
    before = time.time()
    exp = _segments(provider.assign("alice", 1))[1]["exp"]
    assert int(before) + 300 <= exp <= int(time.time()) + 300
    assert provider.info(provider.assign("alice", 1), 1) is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forge(claims, secret: bytes, header=None, digest=hashlib.sha256) -> str:
    """An HS token made without the code under test."""
    header = header if header is not None else {"alg": "HS256", "typ": "JWT"}
    head = _b64(json.dumps(header).encode()) if not isinstance(header, str) else _b64(header.encode())
    body = _b64(json.dumps(claims).encode()) if not isinstance(claims, str) else _b64(claims.encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), digest).digest()
    return f"{head}.{body}.{_b64(signature)}"


GOOD = {"username": "alice", "revision": 3, "exp": int(NOW) + 60}


@pytest.mark.parametrize(
    "claims, expected",
    [
        (GOOD, ("alice", 3)),
        ({**GOOD, "revision": 3.9}, ("alice", 3)),  # a float64 claim, truncated as Go converts it
        ({**GOOD, "username": ""}, ("", 3)),  # the permission check refuses it later
        ({**GOOD, "extra": [1, 2]}, ("alice", 3)),
        ({"username": "alice", "revision": 3}, ("alice", 3)),  # exp is optional to golang-jwt
        ({**GOOD, "exp": 0}, ("alice", 3)),  # and 0 means unset
        ({**GOOD, "nbf": int(NOW) - 1}, ("alice", 3)),
        ({**GOOD, "exp": int(NOW)}, None),
        ({**GOOD, "exp": NOW + 0.5}, None),  # exp is whole seconds
        ({**GOOD, "exp": "tomorrow"}, None),
        ({**GOOD, "exp": None}, None),
        ({**GOOD, "exp": True}, None),
        ({**GOOD, "nbf": int(NOW) + 1}, None),
        ({**GOOD, "nbf": "now"}, None),
        ({"revision": 3, "exp": GOOD["exp"]}, None),
        ({**GOOD, "username": 5}, None),
        ({"username": "alice", "exp": GOOD["exp"]}, None),
        ({**GOOD, "revision": "3"}, None),
        ({**GOOD, "revision": True}, None),
        ({**GOOD, "revision": -1}, None),
        ({**GOOD, "revision": 2**64}, None),
        ([1, 2, 3], None),
        ('{"username":"alice","revision":3,"exp":Infinity}', None),
        ("not json", None),
    ],
)
def test_jwt_claims_checked(keys, claims, expected):
    secret = open(keys["hmac.priv"], "rb").read()
    provider = jwt_provider(keys, "HS256", priv="hmac.priv", clock=FakeClock(NOW))
    info = provider.info(forge(claims, secret), 10)
    assert (None if info is None else (info.username, info.revision)) == expected


def test_jwt_tampered(keys):
    secret = open(keys["hmac.priv"], "rb").read()
    hs = jwt_provider(keys, "HS256", priv="hmac.priv", clock=FakeClock())
    rs = jwt_provider(keys, "RS256", pub="rsa.pub", priv="rsa.priv", clock=FakeClock())
    token = rs.assign("alice", 3)
    head, body, sig = token.split(".")
    root_body = _b64(json.dumps({**_segments(token)[1], "username": "root"}).encode())
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    rsa_pub_pem = open(keys["rsa.pub"], "rb").read()
    cases = {
        "payload swapped": f"{head}.{root_body}.{sig}",
        "signature flipped": f"{head}.{body}.{flipped}",
        "signature truncated": f"{head}.{body}.{sig[:-4]}",
        "signature dropped": f"{head}.{body}.",
        "stray character": f"{head}.{body}.{sig}!",
        "padding": f"{head}.{body}.{sig}==",
        "two segments": f"{head}.{body}",
        "four segments": f"{token}.{sig}",
        "bearer prefix": f"Bearer {token}",
        # Signed with the RSA public key as an HMAC secret: the classic
        # algorithm confusion; the alg must be the configured one.
        "alg confusion": forge(GOOD, rsa_pub_pem),
        "alg none": _b64(b'{"alg":"none"}') + "." + _b64(json.dumps(GOOD).encode()) + ".",
        "no alg": forge(GOOD, secret, header={"typ": "JWT"}),
        "header not an object": forge(GOOD, secret, header="[]"),
        "HS384 as HS256": forge(GOOD, secret, header={"alg": "HS384"}, digest=hashlib.sha384),
    }
    assert rs.info(token, 1) is not None
    for name, forged in cases.items():
        assert rs.info(forged, 1) is None, name
    # The same HMAC forgeries against an HS256 server: only the honest one passes.
    assert hs.info(forge(GOOD, secret), 1) is not None
    assert hs.info(forge(GOOD, secret, header={"alg": "HS384"}, digest=hashlib.sha384), 1) is None
    # Signed right but labelled wrong: golang-jwt goes by the label.
    assert hs.info(forge(GOOD, secret, header={"alg": "HS384"}), 1) is None
    assert hs.info(forge(GOOD, secret, header={"alg": "HS256", "kid": "x"}), 1) is not None
    assert hs.info(forge(GOOD, b"another secret"), 1) is None


@pytest.mark.parametrize(
    "method, signer_pair, verifier_pair",
    [("RS256", "rsa", "rsa-other"), ("ES256", "ec256", "ec256-other"), ("EdDSA", "ed", "ed-other")],
)
def test_jwt_wrong_key(keys, method, signer_pair, verifier_pair):
    signer = jwt_provider(keys, method, priv=f"{signer_pair}.priv")
    verifier = jwt_provider(keys, method, pub=f"{verifier_pair}.pub")
    assert verifier.info(signer.assign("alice", 1), 1) is None


def test_jwt_tokens_cross_methods(keys):
    """A token is valid only under the method it was signed with, even
    with the same key."""
    rs256 = jwt_provider(keys, "RS256", priv="rsa.priv")
    ps256 = jwt_provider(keys, "PS256", priv="rsa.priv")
    rs512 = jwt_provider(keys, "RS512", priv="rsa.priv")
    token = rs256.assign("alice", 1)
    assert ps256.info(token, 1) is None
    assert rs512.info(token, 1) is None


# --- option strings --------------------------------------------------------------


@pytest.mark.parametrize(
    "option, kind",
    [
        ("simple", SimpleTokenProvider),
        ("simple,anything=goes", SimpleTokenProvider),
        ("", NopTokenProvider),
        (",a=b", NopTokenProvider),
        ("jwt,sign-method=HS256,priv-key={hmac.priv}", JWTTokenProvider),
        ("jwt,sign-method=HS256,priv-key={hmac.priv},ttl=", JWTTokenProvider),
        ("jwt,sign-method=HS256,priv-key={hmac.priv},pub-key={rsa.pub}", JWTTokenProvider),  # ignored
        ("jwt,sign-method=HS256,priv-key={hmac.priv},color=blue", JWTTokenProvider),  # warned about
        ("jwt,sign-method=RS256,pub-key=,priv-key={rsa.priv}", JWTTokenProvider),
        ("jwt,ttl=10m,priv-key={ec256.priv},sign-method=ES256", JWTTokenProvider),
    ],
)
def test_good_options(keys, option, kind):
    provider = token_provider(_with_paths(option, keys), 300)
    assert type(provider) is kind


def _with_paths(option: str, keys) -> str:
    """``{rsa.priv}`` in an option string is that key file's path."""
    return re.sub(r"\{([^}]+)\}", lambda m: keys[m.group(1)], option)


@pytest.mark.parametrize(
    "option, error, message",
    [
        # decomposeOpts / NewTokenProvider
        ("bogus", InvalidAuthOptsError, "auth: invalid auth options"),
        ("Simple", InvalidAuthOptsError, "auth: invalid auth options"),
        ("simple,verbose", InvalidAuthOptsError, "auth: invalid auth options"),
        ("simple,a=b=c", InvalidAuthOptsError, "auth: invalid auth options"),
        ("jwt,sign-method=HS256,priv-key={hmac.priv},", InvalidAuthOptsError, "auth: invalid auth options"),
        ("jwt,sign-method=HS256,sign-method=HS256,priv-key={hmac.priv}", InvalidAuthOptsError,
         "auth: invalid auth options"),
        # jwtOptions.Parse: every problem is "invalid auth options"
        ("jwt", InvalidAuthOptsError, "auth: invalid auth options"),
        ("jwt,sign-method=invalid,priv-key={rsa.priv}", InvalidAuthOptsError, "auth: invalid auth options"),
        ("jwt,sign-method=rs256,priv-key={rsa.priv}", InvalidAuthOptsError, "auth: invalid auth options"),
        ("jwt,sign-method=ES256K,priv-key={ec256.priv}", InvalidAuthOptsError, "auth: invalid auth options"),
        ("jwt,sign-method=RS256,priv-key={rsa.priv},ttl=forever", InvalidAuthOptsError,
         "auth: invalid auth options"),
        ("jwt,sign-method=RS256,priv-key={rsa.priv},ttl=5", InvalidAuthOptsError, "auth: invalid auth options"),
        ("jwt,sign-method=HS256,priv-key={missing}", InvalidAuthOptsError, "auth: invalid auth options"),
        ("jwt,sign-method=HS256,pub-key={missing},priv-key={hmac.priv}", InvalidAuthOptsError,
         "auth: invalid auth options"),
        # jwtOptions.Key
        ("jwt,sign-method=none,priv-key={hmac.priv}", InvalidAuthMethodError, "unsupported signing method: none"),
        ("jwt,sign-method=RS256", MissingKeyError, "auth: missing key data"),
        ("jwt,sign-method=RS256,priv-key={empty}", MissingKeyError, "auth: missing key data"),
        ("jwt,sign-method=ES256", MissingKeyError, "auth: missing key data"),
        ("jwt,sign-method=EdDSA", MissingKeyError, "auth: missing key data"),
        ("jwt,sign-method=HS256", MissingKeyError, "auth: missing key data"),
        ("jwt,sign-method=HS256,pub-key={rsa.pub}", MissingKeyError, "auth: missing key data"),
        ("jwt,sign-method=RS256,pub-key={rsa.priv},priv-key={rsa.priv}", KeyFormatError,
         "key is not a valid RSA public key"),
        ("jwt,sign-method=RS256,pub-key={rsa.pub},priv-key={rsa.pub}", KeyFormatError,
         "key is not a valid RSA private key"),
        ("jwt,sign-method=RS256,priv-key={ec256.priv}", KeyFormatError, "key is not a valid RSA private key"),
        ("jwt,sign-method=RS256,priv-key={rsa-encrypted.priv}", KeyFormatError,
         "key is not a valid RSA private key"),
        ("jwt,sign-method=RS256,priv-key={garbage}", KeyFormatError,
         "invalid key: Key must be a PEM encoded PKCS1 or PKCS8 key"),
        ("jwt,sign-method=ES256,pub-key={ec256.priv},priv-key={ec256.priv}", KeyFormatError,
         "key is not a valid ECDSA public key"),
        ("jwt,sign-method=ES256,pub-key={ec256.pub},priv-key={ec256.pub}", KeyFormatError,
         "key is not a valid ECDSA private key"),
        ("jwt,sign-method=ES256,priv-key={ec256-with-params.priv}", KeyFormatError,
         "key is not a valid ECDSA private key"),
        ("jwt,sign-method=ES256,priv-key={ec384.priv}", KeyFormatError, "key is invalid: ES256 needs a secp256r1"),
        ("jwt,sign-method=ES512,pub-key={ec256.pub}", KeyFormatError, "key is invalid: ES512 needs a secp521r1"),
        ("jwt,sign-method=EdDSA,priv-key={rsa.priv}", KeyFormatError, "key is not a valid Ed25519 private key"),
        ("jwt,sign-method=RS256,pub-key={rsa-other.pub},priv-key={rsa.priv}", KeyMismatchError,
         "auth: public and private keys don't match"),
        ("jwt,sign-method=ES256,pub-key={ec256-other.pub},priv-key={ec256.priv}", KeyMismatchError,
         "auth: public and private keys don't match"),
        ("jwt,sign-method=EdDSA,pub-key={ed-other.pub},priv-key={ed.priv}", KeyMismatchError,
         "auth: public and private keys don't match"),
    ],
)
def test_bad_options(keys, option, error, message):
    with pytest.raises(error) as raised:
        token_provider(_with_paths(option, keys), 300)
    assert str(raised.value).startswith(message)
    # Startup configuration errors: no gRPC code, never in mvcckv.errors.
    assert isinstance(raised.value, errors.MvccError)
    assert type(raised.value).__module__ == "mvcckv.server.tokens"


def test_invalid_options_say_why(keys):
    with pytest.raises(InvalidAuthOptsError) as raised:
        token_provider(f"jwt,sign-method=XS256,priv-key={keys['hmac.priv']}", 300)
    assert isinstance(raised.value.__cause__, InvalidAuthMethodError)
    assert str(raised.value.__cause__) == "auth: invalid auth signature method"
    with pytest.raises(InvalidAuthOptsError) as raised:
        token_provider(f"jwt,sign-method=HS256,priv-key={keys['missing']}", 300)
    assert isinstance(raised.value.__cause__, FileNotFoundError)


def test_nop_provider():
    provider = token_provider("", 300)
    assert provider.info("anything", 1) is None
    with pytest.raises(errors.AuthFailedError):
        provider.assign("root", 1)


def test_docstring_examples():
    import doctest

    result = doctest.testmod(tokens)
    assert result.attempted > 0 and result.failed == 0


# --- against real etcd -----------------------------------------------------------


def test_jwt_interoperates_with_etcd(etcd_binary, keys):
    """etcd and mvcckv sharing a key accept each other's tokens, and issue
    the very same bytes for the same claims (RS256 signatures are
    deterministic)."""
    option = f"jwt,pub-key={keys['rsa.pub']},priv-key={keys['rsa.priv']},sign-method=RS256,ttl=1h"
    with EtcdProcess(binary=etcd_binary, extra_args=(*FAST_ELECTION, f"--auth-token={option}")) as etcd:
        with etcd.channel() as channel:
            auth = rpc_pb2_grpc.AuthStub(channel)
            kv = rpc_pb2_grpc.KVStub(channel)
            auth.UserAdd(pb.AuthUserAddRequest(name="root", password="pw"), timeout=10)
            auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
            auth.AuthEnable(pb.AuthEnableRequest(), timeout=10)
            theirs = auth.Authenticate(pb.AuthenticateRequest(name="root", password="pw"), timeout=10).token

            _, claims = _segments(theirs)
            clock = FakeClock(claims["exp"] - 3600 + 0.5)
            ours = token_provider(option, 300, clock)
            assert ours.info(theirs, 0) == tokens.AuthInfo("root", claims["revision"])
            assert ours.assign("root", claims["revision"]) == theirs

            clock.now += 1
            mine = ours.assign("root", claims["revision"])
            assert mine != theirs
            kv.Put(pb.PutRequest(key=b"k", value=b"v"), metadata=[("token", mine)], timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                kv.Put(pb.PutRequest(key=b"k", value=b"v"), metadata=[("token", mine[:-2])], timeout=10)
            assert refused.value.details() == "etcdserver: invalid auth token"
