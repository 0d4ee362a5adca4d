"""Users and groups, as plain functions over a session (the requests service
checks who may call them)."""
import re

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from cirrus import auth
from cirrus.db import iso
from cirrus.db.models import Group, GroupMember, Token, User
from cirrus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.requests import quotas

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
MIN_PASSWORD = 8


def check_name(kind, name):
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidArgument(f"name: a {kind} name is 1 to 128 letters, digits, '.', '_', '@' "
                              f"or '-', starting with a letter or digit; got {name!r}")
    return name


def check_password(password):
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise InvalidArgument(f"password: at least {MIN_PASSWORD} characters")
    return password


def check_role(role):
    try:
        return auth.check_role(role)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def group_names(session, user_id):
    return session.scalars(select(Group.name).join(GroupMember, GroupMember.group_id == Group.id)
                           .where(GroupMember.user_id == user_id).order_by(Group.id)).all()


def user_dict(session, user):
    return {"id": user.id, "name": user.name, "role": user.role,
            "groups": group_names(session, user.id),
            "created_at": iso(user.created_at)}


def find_user(session, ref):
    """A user by id (int) or name."""
    return _find(session, User, "user", ref)


def find_group(session, ref):
    """A group by id (int) or name."""
    return _find(session, Group, "group", ref)


def _find(session, model, what, ref):
    column = model.id if isinstance(ref, int) else model.name
    row = session.scalar(select(model).where(column == ref))
    if row is None:
        raise NotFound(f"{what} {ref!r} does not exist")
    return row


def create_user(session, name, password, role="user", groups=()):
    check_name("user", name)
    check_password(password)
    check_role(role or "user")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AlreadyExists(f"user {name!r} already exists")
    found = [find_group(session, g) for g in groups or ()]
    user = User(name=name, role=role or "user", password_hash=auth.hash_password(password))
    session.add(user)
    session.flush()
    for group in found:
        session.add(GroupMember(group_id=group.id, user_id=user.id))
    session.flush()
    return user_dict(session, user)


def list_users(session):
    return [user_dict(session, u) for u in session.scalars(select(User).order_by(User.id))]


def set_role(session, ref, role):
    user = find_user(session, ref)
    check_role(role)
    if user.role == "admin" and role != "admin":
        _keep_an_admin(session, user)
    user.role = role
    return user_dict(session, user)


def set_password(session, ref, password):
    """A new password; the user's tokens stop working (they must log in again)."""
    user = find_user(session, ref)
    user.password_hash = auth.hash_password(check_password(password))
    session.execute(delete(Token).where(Token.user_id == user.id))
    return user_dict(session, user)


def _keep_an_admin(session, user):
    admins = session.scalar(select(func.count()).select_from(User).where(User.role == "admin"))
    if admins <= 1:
        raise FailedPrecondition(f"user {user.name!r} is the last administrator")


def delete_user(session, ref, caller_id):
    """Delete a user who owns nothing any more (VMs, images, templates...
    keep their owner: refused, naming what is left)."""
    user = find_user(session, ref)
    if user.id == caller_id:
        raise FailedPrecondition("you cannot delete yourself")
    if user.role == "admin":
        _keep_an_admin(session, user)
    gone = user_dict(session, user)
    try:
        with session.begin_nested():
            session.delete(user)
            session.flush()
    except IntegrityError as exc:
        table = getattr(getattr(exc.orig, "diag", None), "table_name", None) or "resources"
        raise FailedPrecondition(f"user {gone['name']!r} still owns {table}: delete them, or "
                                 "wait until they are DONE and gone, first") from None
    quotas.forget(session, "user", gone["id"])
    return gone


def group_dict(session, group):
    members = session.scalars(select(User.name).join(GroupMember, GroupMember.user_id == User.id)
                              .where(GroupMember.group_id == group.id).order_by(User.id)).all()
    return {"id": group.id, "name": group.name, "users": list(members),
            "created_at": iso(group.created_at)}


def create_group(session, name):
    check_name("group", name)
    if session.scalar(select(Group.id).where(Group.name == name)) is not None:
        raise AlreadyExists(f"group {name!r} already exists")
    group = Group(name=name)
    session.add(group)
    session.flush()
    return group_dict(session, group)


def list_groups(session):
    return [group_dict(session, g) for g in session.scalars(select(Group).order_by(Group.id))]


def delete_group(session, ref):
    """Delete a group; its members stay, without it."""
    group = find_group(session, ref)
    gone = group_dict(session, group)
    session.delete(group)
    quotas.forget(session, "group", gone["id"])
    return gone


def add_member(session, group_ref, user_ref):
    group, user = find_group(session, group_ref), find_user(session, user_ref)
    if session.get(GroupMember, (group.id, user.id)) is not None:
        raise AlreadyExists(f"user {user.name!r} is already in group {group.name!r}")
    session.add(GroupMember(group_id=group.id, user_id=user.id))
    session.flush()
    return group_dict(session, group)


def remove_member(session, group_ref, user_ref):
    group, user = find_group(session, group_ref), find_user(session, user_ref)
    member = session.get(GroupMember, (group.id, user.id))
    if member is None:
        raise NotFound(f"user {user.name!r} is not in group {group.name!r}")
    session.delete(member)
    session.flush()
    return group_dict(session, group)
