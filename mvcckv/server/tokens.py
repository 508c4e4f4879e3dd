"""Auth tokens: etcd's ``--auth-token`` providers.

``Authenticate`` trades a checked password for a token; every later request
shows the token and :meth:`TokenProvider.info` turns it back into who is
asking.  ``--auth-token`` picks the kind (etcd's ``NewTokenProvider``):

``simple`` (the default)
    ``<16 random ASCII letters>.<n>``, e.g. ``kXlTZcmFhpgNvOyA.7``, known
    only to the server that issued it.  It lives ``--auth-token-ttl``
    seconds (300) after its last use: every successful :meth:`info` pushes
    the deadline out again.  etcd's ``n`` is the raft index of the
    Authenticate request; here it is a counter, which makes every token
    unique just the same.  Tokens go when their user is deleted or changes
    password (:meth:`invalidate_user`), all of them when auth is disabled,
    and all on restart: they are kept in memory only.

``jwt,pub-key=PATH,priv-key=PATH,sign-method=RS256,ttl=5m``
    A signed JSON Web Token whose claims are exactly etcd's,
    ``{"exp": <unix seconds>, "revision": <auth revision>, "username": ...}``,
    so etcd and mvcckv servers sharing a key accept each other's tokens.
    It cannot be refreshed or revoked; it expires ``ttl`` (a Go duration,
    default ``5m``) after it was issued.  The signing methods are
    golang-jwt's: ``RS256/384/512`` and ``PS256/384/512`` (RSA keys),
    ``ES256/384/512`` (P-256/384/521 keys), ``EdDSA`` (Ed25519 keys) and
    ``HS256/384/512``, whose secret is the raw bytes of ``priv-key``.  Given
    only ``pub-key`` the server verifies tokens but cannot issue them.

``""`` (the empty string)
    No tokens at all: Authenticate fails and only TLS client certificates
    identify callers.

A malformed ``--auth-token`` is refused at startup with etcd's message;
those errors are configuration errors, never sent to a client, so they are
defined here rather than in :mod:`mvcckv.errors`.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import secrets
import string
import threading
import time
from typing import Callable, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from mvcckv import errors
from mvcckv.auth import AuthInfo
from mvcckv.server.compactor import SECOND, parse_duration

log = logging.getLogger("mvcckv.server")

Clock = Callable[[], float]


# --- configuration errors ------------------------------------------------------


class InvalidAuthOptsError(errors.MvccError):
    """``--auth-token`` cannot be parsed; ``__cause__`` says why."""

    message = "auth: invalid auth options"


class InvalidAuthMethodError(errors.MvccError):
    message = "auth: invalid auth signature method"


class MissingKeyError(errors.MvccError):
    message = "auth: missing key data"


class KeyMismatchError(errors.MvccError):
    message = "auth: public and private keys don't match"


class KeyFormatError(errors.MvccError):
    """A key file that is not a key of the signing method's kind (golang-jwt's texts)."""

    message = "invalid key: Key must be a PEM encoded PKCS1 or PKCS8 key"


class VerifyOnlyError(errors.MvccError):
    """Authenticate on a server that has only the public key.  etcd sends
    this text to the client with code Unknown, as every error missing from
    its table; so does mvcckv's ``rpctypes``."""

    message = "auth: token signing attempted with verify-only key"


# --- the protocol ----------------------------------------------------------------


class TokenProvider(Protocol):
    def assign(self, username: str, revision: int) -> str:
        """A new token for ``username``, whose password was checked at auth
        ``revision``.  Safe to call from any thread."""

    def info(self, token: str, revision: int) -> AuthInfo | None:
        """Who ``token`` belongs to; None if it is unknown, expired or
        forged.  ``revision`` is the store's current auth revision: simple
        tokens report it, JWTs report their own claim (so an auth change
        since the token was issued fails the request with "revision of auth
        store is old").  On every request's path."""

    def invalidate_user(self, username: str) -> None:
        """Forget ``username``'s tokens (simple tokens only: a JWT stays
        valid until it expires)."""

    def enable(self) -> None: ...

    def disable(self) -> None:
        """Auth was disabled: every simple token goes."""

    def close(self) -> None: ...


SIMPLE_TOKEN_TTL = 300  # seconds; etcd's default for --auth-token-ttl
JWT_DEFAULT_TTL = 5 * 60 * SECOND


def token_provider(option: str, ttl_seconds: int = SIMPLE_TOKEN_TTL, clock: Clock | None = None) -> TokenProvider:
    """The provider ``--auth-token`` asks for (etcd's ``NewTokenProvider``).

    ``option`` is a type and ``,key=value`` pairs: a pair without exactly
    one ``=`` or a repeated key is refused whatever the type, other pairs
    are ignored by ``simple`` and checked by ``jwt``.  ``ttl_seconds`` is
    ``--auth-token-ttl``, for simple tokens only (0 means the default).
    ``clock`` defaults to the monotonic clock for simple tokens and the
    wall clock for JWTs, whose expiry is a Unix time.

    >>> token_provider("simple", 300).assign("root", 1).count(".")
    1
    >>> token_provider("bogus", 300)
    Traceback (most recent call last):
    ...
    mvcckv.server.tokens.InvalidAuthOptsError: auth: invalid auth options
    """
    kind, options = _decompose(option)
    if kind == "simple":
        provider = SimpleTokenProvider(ttl_seconds, clock or time.monotonic)
        log.warning("simple token is not cryptographically signed")
        return provider
    if kind == "jwt":
        return _jwt_provider(options, clock or time.time)
    if kind == "":
        return NopTokenProvider()
    raise InvalidAuthOptsError()


def _decompose(option: str) -> tuple[str, dict[str, str]]:
    kind, *pairs = option.split(",")
    options: dict[str, str] = {}
    for pair in pairs:
        key_value = pair.split("=")
        if len(key_value) != 2 or key_value[0] in options:
            raise InvalidAuthOptsError()
        options[key_value[0]] = key_value[1]
    return kind, options


# --- simple tokens ---------------------------------------------------------------

_TOKEN_LETTERS = string.ascii_letters
_TOKEN_PREFIX_LENGTH = 16
# Expired tokens that nobody shows again are swept when the table has
# doubled since the last sweep (never below this size), so a sweep's cost
# is paid for by the assigns that grew the table, and the table never
# holds more than twice the tokens that were live at the last sweep.
_SWEEP_MIN = 1024


class _Entry:
    """One live simple token: its user, its deadline (pushed out on every
    use, in place), and the identity last returned for it, handed out again
    while the auth revision stays the same (AuthInfo is immutable)."""

    __slots__ = ("username", "deadline", "info")

    def __init__(self, username: str, deadline: float):
        self.username = username
        self.deadline = deadline
        self.info: AuthInfo | None = None


class SimpleTokenProvider:
    """etcd's simple tokens (see the module docstring).

    Tokens are issued on worker threads and looked up on the event loop, so
    the table is guarded by a lock; a lookup is one dict probe and one
    clock read, and allocates nothing unless the auth revision moved.
    Expiry needs no timer: a token is checked for expiry when it is shown,
    and the table is swept as it grows (``_SWEEP_MIN``).

    >>> now = [0.0]
    >>> tokens = SimpleTokenProvider(ttl_seconds=10, clock=lambda: now[0])
    >>> tokens.enable()
    >>> token = tokens.assign("alice", 3)
    >>> tokens.info(token, 5)
    AuthInfo(username='alice', revision=5)
    >>> now[0] = 9.0; tokens.info(token, 5) is not None   # refreshed
    True
    >>> now[0] = 20.0; tokens.info(token, 5) is None      # idle for 11 s
    True
    """

    def __init__(self, ttl_seconds: float = SIMPLE_TOKEN_TTL, clock: Clock = time.monotonic):
        self.ttl = ttl_seconds if ttl_seconds > 0 else SIMPLE_TOKEN_TTL
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, _Entry] = {}
        self._enabled = False
        self._index = 0
        self._sweep_at = _SWEEP_MIN

    def __len__(self) -> int:
        """Tokens held, expired ones not yet swept included."""
        return len(self._tokens)

    def assign(self, username: str, revision: int) -> str:
        # As etcd: a token issued while auth is off is never valid (auth can
        # be disabled between the password check and this call).
        prefix = "".join(secrets.choice(_TOKEN_LETTERS) for _ in range(_TOKEN_PREFIX_LENGTH))
        now = self._clock()
        with self._lock:
            self._index += 1
            token = f"{prefix}.{self._index}"
            if self._enabled:
                self._tokens[token] = _Entry(username, now + self.ttl)
                if len(self._tokens) >= self._sweep_at:
                    self._sweep(now)
        return token

    def info(self, token: str, revision: int) -> AuthInfo | None:
        now = self._clock()
        with self._lock:
            entry = self._tokens.get(token)
            if entry is None:
                return None
            if now > entry.deadline:
                del self._tokens[token]
                return None
            entry.deadline = now + self.ttl
            info = entry.info
            if info is None or info.revision != revision:
                info = entry.info = AuthInfo(entry.username, revision)
        return info

    def invalidate_user(self, username: str) -> None:
        with self._lock:
            self._tokens = {t: e for t, e in self._tokens.items() if e.username != username}

    def enable(self) -> None:
        with self._lock:
            self._enabled = True

    def disable(self) -> None:
        with self._lock:
            self._enabled = False
            self._tokens = {}
            self._sweep_at = _SWEEP_MIN

    def close(self) -> None:
        self.disable()

    def _sweep(self, now: float) -> None:
        self._tokens = {t: e for t, e in self._tokens.items() if e.deadline >= now}
        self._sweep_at = max(_SWEEP_MIN, 2 * len(self._tokens))


# --- no tokens -------------------------------------------------------------------


class NopTokenProvider:
    """``--auth-token ""``: nothing is issued and no token is valid."""

    def assign(self, username: str, revision: int) -> str:
        raise errors.AuthFailedError()

    def info(self, token: str, revision: int) -> AuthInfo | None:
        return None

    def invalidate_user(self, username: str) -> None:
        pass

    def enable(self) -> None:
        pass

    def disable(self) -> None:
        pass

    def close(self) -> None:
        pass


# --- JSON Web Tokens -------------------------------------------------------------

_HMAC, _RSA, _ECDSA, _ED25519 = "HMAC", "RSA", "ECDSA", "Ed25519"

# golang-jwt's signing methods: family and, for ECDSA, the one curve each
# accepts (golang-jwt refuses to sign with any other).
_SIGN_METHODS: dict[str, tuple[str, type[ec.EllipticCurve] | None]] = {
    "HS256": (_HMAC, None), "HS384": (_HMAC, None), "HS512": (_HMAC, None),
    "RS256": (_RSA, None), "RS384": (_RSA, None), "RS512": (_RSA, None),
    "PS256": (_RSA, None), "PS384": (_RSA, None), "PS512": (_RSA, None),
    "ES256": (_ECDSA, ec.SECP256R1), "ES384": (_ECDSA, ec.SECP384R1), "ES512": (_ECDSA, ec.SECP521R1),
    "EdDSA": (_ED25519, None),
}
# golang-jwt also registers "none", which etcd parses and then cannot use.
_UNSIGNED = "none"

_KEY_TYPES = {
    _RSA: (rsa.RSAPrivateKey, rsa.RSAPublicKey),
    _ECDSA: (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey),
    _ED25519: (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey),
}

_KNOWN_OPTIONS = ("sign-method", "pub-key", "priv-key", "ttl")

_ALGORITHMS = get_default_algorithms()
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


class JWTTokenProvider:
    """etcd's JWT tokens (see the module docstring).  Stateless, so safe
    from any thread; :meth:`info` checks what golang-jwt checks: the
    ``alg`` header is the configured method, the signature, ``exp`` (the
    token is valid strictly before it) and ``nbf`` when present, then
    etcd's own ``username`` (a string) and ``revision`` (a number)."""

    def __init__(self, sign_method: str, signing_key, verify_key, ttl_ns: int = JWT_DEFAULT_TTL,
                 clock: Clock = time.time):
        self.sign_method = sign_method
        self.ttl = ttl_ns / SECOND
        self._algorithm = _ALGORITHMS[sign_method]
        self._signing_key = signing_key
        self._verify_key = verify_key
        self._clock = clock
        self._header = _b64encode(_json({"alg": sign_method, "typ": "JWT"}))

    @property
    def verify_only(self) -> bool:
        return self._signing_key is None

    def assign(self, username: str, revision: int) -> str:
        if self._signing_key is None:
            raise VerifyOnlyError()
        claims = {"exp": math.floor(self._clock() + self.ttl), "revision": revision, "username": username}
        signing_input = self._header + b"." + _b64encode(_json(claims))
        signature = self._algorithm.sign(signing_input, self._signing_key)
        return (signing_input + b"." + _b64encode(signature)).decode("ascii")

    def info(self, token: str, revision: int) -> AuthInfo | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        header_segment, claims_segment, signature_segment = parts
        try:
            header = _json_segment(header_segment)
            if not isinstance(header, dict) or header.get("alg") != self.sign_method:
                return None
            claims = _json_segment(claims_segment)
            if not isinstance(claims, dict):
                return None
            signature = _b64decode(signature_segment)
            expires = _numeric_date(claims, "exp")
            not_before = _numeric_date(claims, "nbf")
            username = claims.get("username")
            revision_claim = claims.get("revision")
            if (not isinstance(username, str) or isinstance(revision_claim, bool)
                    or not isinstance(revision_claim, (int, float))):
                return None
            # The claim reaches golang-jwt as a float64 and etcd converts it.
            claimed = float(revision_claim)
        except (ValueError, OverflowError):  # binascii, JSON and UTF-8 errors are ValueErrors
            return None
        if not 0 <= claimed < 2**64:
            return None
        now = self._clock()
        if expires is not None and not now < expires:
            return None
        if not_before is not None and now < not_before:
            return None
        signing_input = f"{header_segment}.{claims_segment}".encode("ascii")
        if not self._algorithm.verify(signing_input, self._verify_key, signature):
            return None
        return AuthInfo(username, int(claimed))

    def invalidate_user(self, username: str) -> None:
        pass

    def enable(self) -> None:
        pass

    def disable(self) -> None:
        pass

    def close(self) -> None:
        pass


def _jwt_provider(options: dict[str, str], clock: Clock) -> JWTTokenProvider:
    """etcd's ``newTokenProviderJWT``: options first (any problem is "invalid
    auth options"), then the keys, each with its own error."""
    try:
        ttl = parse_duration(options["ttl"]) if options.get("ttl") else JWT_DEFAULT_TTL
        public_pem = _read_key_file(options.get("pub-key"))
        private_pem = _read_key_file(options.get("priv-key"))
        method = options.get("sign-method", "")
        if method not in _SIGN_METHODS and method != _UNSIGNED:
            raise InvalidAuthMethodError()
    except (ValueError, OSError, InvalidAuthMethodError) as exc:
        log.error("problem loading JWT options: %s", exc)
        raise InvalidAuthOptsError() from exc
    unknown = sorted(set(options) - set(_KNOWN_OPTIONS))
    if unknown:
        log.warning("unknown JWT options: %s", ", ".join(unknown))
    if method == _UNSIGNED:
        raise InvalidAuthMethodError(f"unsupported signing method: {method}")

    family, curve = _SIGN_METHODS[method]
    if family == _HMAC:
        if not private_pem:
            raise MissingKeyError()
        return JWTTokenProvider(method, private_pem, private_pem, ttl, clock)

    private = _load_private_key(private_pem, family) if private_pem else None
    public = _load_public_key(public_pem, family) if public_pem else None
    if private is None and public is None:
        raise MissingKeyError()
    if private is not None and public is not None and _spki(public) != _spki(private.public_key()):
        raise KeyMismatchError()
    verify_key = public if public is not None else private.public_key()
    if curve is not None and not isinstance(verify_key.curve, curve):
        # golang-jwt would start and then fail every Authenticate (or every
        # token, if verify-only); refuse the configuration instead.
        raise KeyFormatError(f"key is invalid: {method} needs a {curve.name} key, not {verify_key.curve.name}")
    return JWTTokenProvider(method, private, verify_key, ttl, clock)


def _read_key_file(path: str | None) -> bytes:
    if not path:
        return b""
    with open(path, "rb") as f:
        return f.read()


# Go's pem.Decode: the first PEM block of the file, whatever follows it.
_PEM_BLOCK = re.compile(rb"-----BEGIN ([^\r\n-]*)-----\r?\n.*?-----END \1-----", re.DOTALL)


def _pem_block(data: bytes) -> bytes:
    match = _PEM_BLOCK.search(data)
    if match is None:
        raise KeyFormatError()
    return match.group(0)


def _load_private_key(data: bytes, family: str):
    block = _pem_block(data)
    expected = _KEY_TYPES[family][0]
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: encrypted
        key = None
    if not isinstance(key, expected):
        raise KeyFormatError(f"key is not a valid {family} private key")
    return key


def _load_public_key(data: bytes, family: str):
    """A ``PUBLIC KEY`` (PKIX), ``RSA PUBLIC KEY`` (PKCS#1) or the key of
    a ``CERTIFICATE``, as golang-jwt reads them."""
    block = _pem_block(data)
    expected = _KEY_TYPES[family][1]
    try:
        key = serialization.load_pem_public_key(block)
    except (ValueError, UnsupportedAlgorithm):
        try:
            key = x509.load_pem_x509_certificate(block).public_key()
        except ValueError:
            key = None
    if not isinstance(key, expected):
        raise KeyFormatError(f"key is not a valid {family} public key")
    return key


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _json(value) -> bytes:
    """Go's ``json.Marshal`` of a map: sorted keys, no spaces, and ``<``,
    ``>``, ``&``, U+2028 and U+2029 escaped, so that a token is the same
    bytes etcd would issue.  (Those characters only occur inside strings.)"""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in _GO_ESCAPES:
        text = text.replace(char, escaped)
    return text.encode("utf-8")


_GO_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def _b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64decode(segment: str) -> bytes:
    # Unpadded base64url only: Python's decoder would skip stray characters,
    # which would let many strings pass for one signature.
    if _SEGMENT.fullmatch(segment) is None:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_segment(segment: str):
    return json.loads(_b64decode(segment), parse_constant=_reject_constant)


def _numeric_date(claims: dict, name: str) -> int | None:
    """golang-jwt's reading of a time claim: whole seconds; absent or 0 is
    unset; anything but a number makes the token invalid."""
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} is not a number")
    if value == 0:
        return None
    return math.floor(value)

