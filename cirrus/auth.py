"""Users, roles, password hashes and login tokens.

Passwords are hashed with argon2id. Hashes made before it (scrypt, the first
format) still verify, and are replaced by an argon2 hash the next time their
user logs in.
"""
import hashlib
import hmac
import secrets
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select

from cirrus import config
from cirrus.db.models import Token, User, utcnow

# admin: everything; cloud-admin and finance: users who also decide the
# approvals of their role (issue 8); user: their own resources
ROLES = ("admin", "cloud-admin", "finance", "user")
# OWASP's argon2id minimum (19 MiB, 2 passes): every Basic-authenticated call
# pays it, so no more than that
_ARGON2 = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
_SCRYPT = dict(n=2 ** 14, r=8, p=1)


class AuthError(Exception):
    """Missing or wrong credentials."""


def hash_password(password):
    return _ARGON2.hash(password)


def _check_scrypt(password, stored):
    _, n, r, p, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), dklen=32,
                               n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate.hex(), digest)


def check_password(password, stored):
    """Whether ``password`` matches ``stored`` (argon2, or the older scrypt);
    a hash in neither format matches nothing."""
    if stored.startswith("scrypt$"):
        try:
            return _check_scrypt(password, stored)
        except ValueError:
            return False
    try:
        return _ARGON2.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored):
    """True for a hash older than today's argon2 parameters (scrypt included)."""
    if not stored.startswith("$argon2"):
        return True
    try:
        return _ARGON2.check_needs_rehash(stored)
    except InvalidHashError:
        return True


def check_role(role):
    if role not in ROLES:
        raise ValueError(f"role: unknown role {role!r}; choose from {', '.join(ROLES)}")
    return role


def _token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


def ensure_admin(session):
    """Create the bootstrap admin from the configuration if no user has that name."""
    cfg = config.get()["auth"]
    name = str(cfg["admin_user"])
    if session.scalar(select(User).where(User.name == name)) is None:
        session.add(User(name=name, role="admin",
                         password_hash=hash_password(str(cfg["admin_password"]))))


def login(session, username, password):
    """Check a password and issue a token; returns (user, token, expiry).
    An old-format hash is replaced by an argon2 one (the caller commits)."""
    user = authenticate(session, {"username": username, "password": password})
    token = secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(seconds=int(config.get()["auth"]["token_ttl"]))
    session.add(Token(user_id=user.id, token_hash=_token_hash(token), expires_at=expires))
    # expired tokens are of no use to anyone: drop the user's while we are here
    session.query(Token).filter(Token.user_id == user.id,
                                Token.expires_at <= utcnow()).delete()
    return user, token, expires


def logout(session, token):
    """Forget a token; returns whether it existed."""
    return bool(session.query(Token).filter(Token.token_hash == _token_hash(token)).delete())


def authenticate(session, credentials):
    """The User behind ``{"token": ...}`` or ``{"username": ..., "password": ...}``.
    A password checked against an old-format hash rehashes it in ``session``."""
    credentials = credentials or {}
    if credentials.get("token"):
        row = session.execute(
            select(User, Token.expires_at).join(Token, Token.user_id == User.id)
            .where(Token.token_hash == _token_hash(credentials["token"]))).first()
        if row is None:
            raise AuthError("unknown token")
        if row.expires_at <= utcnow():
            raise AuthError("token expired; log in again")
        return row.User
    username, password = credentials.get("username"), credentials.get("password")
    if not username or password is None:
        raise AuthError("no credentials: send a token, or a username and password")
    user = session.scalar(select(User).where(User.name == username))
    if user is None or not check_password(password, user.password_hash):
        raise AuthError("wrong username or password")
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user
