"""Users, password hashes and login tokens."""
import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import select

from cirrus import config
from cirrus.db.models import Token, User, utcnow

_SCRYPT = dict(n=2 ** 14, r=8, p=1)


class AuthError(Exception):
    """Missing or wrong credentials."""


def hash_password(password):
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}${salt}${digest}".format(salt=salt.hex(), digest=digest.hex(), **_SCRYPT)


def check_password(password, stored):
    _, n, r, p, salt, digest = stored.split("$")
    candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), dklen=32,
                               n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate.hex(), digest)


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
    """Check a password and issue a token; returns (user, token, expiry)."""
    user = authenticate(session, {"username": username, "password": password})
    token = secrets.token_urlsafe(32)
    expires = utcnow() + timedelta(seconds=int(config.get()["auth"]["token_ttl"]))
    session.add(Token(user_id=user.id, token_hash=_token_hash(token), expires_at=expires))
    return user, token, expires


def authenticate(session, credentials):
    """The User behind ``{"token": ...}`` or ``{"username": ..., "password": ...}``."""
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
    return user
