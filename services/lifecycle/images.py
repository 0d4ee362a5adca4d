"""Datastores and images (issue 5).

An IMAGE datastore is a directory on the front end; a SYSTEM datastore is a
node's directory of running VMs (one per host). An image is registered in
place from a path that ``qemu-img info`` reads as qcow2 or raw; the file is
not copied, and deleting the image leaves it where it was.

Image states: READY, USED (shown when VMs use it: any number for a
non-persistent image, exactly one for a persistent one), LOCKED (a SAVE_AS
image while its VM runs), ERROR (its save failed). Users are rows of
``image_users``: a deploy INSERTs one, so deploys of one image never wait
for each other, and a persistent image's row is unique, so a second VM's
INSERT ... ON CONFLICT DO NOTHING comes back empty.
"""
import json
import os
import subprocess
import uuid

from sqlalchemy import func, select, text

from cirrus.db import get_row, iso
from cirrus.db.models import Datastore, Host, Image, ImageUser, User
from cirrus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cirrus.template import is_digits

DATASTORE_TYPES = ("IMAGE", "SYSTEM")
IMAGE_FORMATS = ("qcow2", "raw")
SECTOR = 512
QEMU_IMG_TIMEOUT = 30


class ImageBusy(Exception):
    """An image a VM asks for cannot be had now; the VM waits with this reason."""


# ---------------------------------------------------------------- datastores

def datastore_to_dict(session, ds):
    host = session.get(Host, ds.host_id) if ds.host_id else None
    images = session.scalar(select(func.count()).select_from(Image)
                            .where(Image.datastore_id == ds.id))
    return {"id": ds.id, "name": ds.name, "type": ds.type, "path": ds.path,
            "host_id": ds.host_id, "host": host.name if host else None, "images": images,
            "created_at": iso(ds.created_at)}


def create_datastore(session, name, type, path, host_id=None):
    """An IMAGE datastore's directory is made on the front end if missing; a
    SYSTEM datastore's lives on its node (``host_id``), which makes it."""
    name = (name or "").strip()
    if not name:
        raise InvalidArgument("name: must not be empty")
    kind = str(type or "").upper()
    if kind not in DATASTORE_TYPES:
        raise InvalidArgument(f"type: must be one of {', '.join(DATASTORE_TYPES)}, got {type!r}")
    if not path or not os.path.isabs(str(path)):
        raise InvalidArgument(f"path: must be an absolute directory, got {path!r}")
    path = os.path.normpath(str(path))
    if host_id is not None:
        if kind != "SYSTEM":
            raise InvalidArgument("host_id: only a SYSTEM datastore belongs to a host")
        if session.get(Host, host_id) is None:
            raise NotFound(f"host_id: host {host_id} does not exist")
    if session.scalar(select(Datastore.id).where(Datastore.name == name)) is not None:
        raise AlreadyExists(f"datastore {name!r} already exists")
    if kind == "IMAGE":
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise InvalidArgument(f"path: cannot make directory {path}: {exc.strerror}") from None
    ds = Datastore(name=name, type=kind, path=path, host_id=host_id)
    session.add(ds)
    session.flush()
    return ds


def find_named(session, model, ref, what, where):
    """A row of ``model`` by id (an int or digits) or by name; NotFound
    naming ``where`` (the field that gave ``ref``) and ``what`` it is."""
    if isinstance(ref, int) or is_digits(str(ref)):
        row = session.get(model, int(ref))
    else:
        row = session.scalar(select(model).where(model.name == str(ref)))
    if row is None:
        raise NotFound(f"{where}: {what} {ref!r} does not exist")
    return row


def get_datastore(session, ref, where="datastore"):
    """A datastore by id or name."""
    return find_named(session, Datastore, ref, "datastore", where)


def list_datastores(session):
    return [datastore_to_dict(session, ds)
            for ds in session.scalars(select(Datastore).order_by(Datastore.id))]


def delete_datastore(session, ds_id):
    ds = get_row(session, Datastore, ds_id, "datastore", lock=True)
    out = datastore_to_dict(session, ds)
    if out["images"]:
        raise FailedPrecondition(f"datastore {ds.name!r} still has {out['images']} images; "
                                 "delete them first")
    session.delete(ds)
    return out


# ---------------------------------------------------------------- inspecting a file

def qemu_img_info(path):
    """``qemu-img info --output=json`` of a file, as a dict."""
    try:
        done = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True,
                              text=True, timeout=QEMU_IMG_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise InvalidArgument(f"path: qemu-img info {path} took over {QEMU_IMG_TIMEOUT} s") \
            from None
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        raise InvalidArgument(f"path: {path} is not a disk image: {detail}")
    return json.loads(done.stdout)


def looks_like_text(head):
    """Whether the first bytes of a file read as text: a raw image starts
    with a boot sector or zeros, which are not printable."""
    if not head:
        return False
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\n\r\t" for c in decoded)


def judge_image(path, info, head, file_size):
    """(format, virtual size in bytes) of a file from ``qemu-img info``, or
    InvalidArgument naming the path. qemu-img calls anything it does not
    recognise "raw", so a raw image must also be whole sectors and not text."""
    fmt = info.get("format")
    if fmt not in IMAGE_FORMATS:
        raise InvalidArgument(f"path: {path} is a {fmt} image; Cirrus takes "
                              f"{' or '.join(IMAGE_FORMATS)}")
    size = int(info.get("virtual-size") or 0)
    if fmt == "raw":
        if file_size == 0:
            raise InvalidArgument(f"path: {path} is not a disk image: it is empty")
        if file_size % SECTOR:
            raise InvalidArgument(f"path: {path} is not a disk image: {file_size} bytes is not "
                                  f"a whole number of {SECTOR}-byte sectors")
        if looks_like_text(head):
            raise InvalidArgument(f"path: {path} is not a disk image: it is a text file")
    return fmt, size


def inspect_image(path):
    """Check that ``path`` is a qcow2 or raw disk image: (format, size in bytes)."""
    if not path or not os.path.isabs(str(path)):
        raise InvalidArgument(f"path: must be an absolute path, got {path!r}")
    if not os.path.exists(path):
        raise InvalidArgument(f"path: {path} does not exist")
    if not os.path.isfile(path):
        raise InvalidArgument(f"path: {path} is not a file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError as exc:
        raise InvalidArgument(f"path: cannot read {path}: {exc.strerror}") from None
    return judge_image(path, qemu_img_info(path), head, os.path.getsize(path))


# ---------------------------------------------------------------- images

def image_users(session, image_id):
    return session.scalars(select(ImageUser.vm_id).where(ImageUser.image_id == image_id)
                           .order_by(ImageUser.vm_id)).all()


def shown_state(image, users):
    return "USED" if image.state == "READY" and users else image.state


def image_to_dict(session, image, owner_name=None):
    users = image_users(session, image.id)
    if owner_name is None:
        owner_name = session.get(User, image.owner_id).name
    ds = session.get(Datastore, image.datastore_id)
    return {"id": image.id, "name": image.name, "owner": owner_name, "owner_id": image.owner_id,
            "datastore_id": image.datastore_id, "datastore": ds.name if ds else None,
            "path": image.path, "format": image.format, "size_mb": image.size_mb,
            "state": shown_state(image, users), "persistent": image.persistent,
            "running_vms": len(users), "vms": users, "error": image.error,
            "created_at": iso(image.created_at)}


def default_image_datastore(session):
    stores = session.scalars(select(Datastore).where(Datastore.type == "IMAGE")
                             .order_by(Datastore.id)).all()
    if len(stores) != 1:
        names = ", ".join(ds.name for ds in stores) or "none exists yet"
        raise InvalidArgument(f"datastore: give the IMAGE datastore to register in ({names})")
    return stores[0]


def register_image(session, owner_id, name, path, datastore=None, persistent=False,
                   inspect=inspect_image):
    """Register the disk image at ``path`` (checked with qemu-img) in an
    IMAGE datastore (by id or name; the only one when not given)."""
    name = check_new_name(session, owner_id, name)
    ds = get_datastore(session, datastore) if datastore not in (None, "") else \
        default_image_datastore(session)
    if ds.type != "IMAGE":
        raise InvalidArgument(f"datastore: {ds.name!r} is a {ds.type} datastore; images go in "
                              "an IMAGE datastore")
    fmt, size = inspect(str(path) if path else path)
    image = Image(name=name, owner_id=owner_id, datastore_id=ds.id,
                  path=os.path.realpath(path), format=fmt,
                  size_mb=-(-size // (1024 * 1024)), state="READY", persistent=bool(persistent))
    session.add(image)
    session.flush()
    return image


def check_new_name(session, owner_id, name, where="name"):
    """An image name the owner does not use yet, stripped."""
    name = str(name or "").strip()
    if not name:
        raise InvalidArgument(f"{where}: must not be empty")
    if session.scalar(select(Image.id).where(Image.owner_id == owner_id,
                                             Image.name == name)) is not None:
        raise AlreadyExists(f"{where}: image {name!r} already exists")
    return name


def get_image(session, image_id, lock=False):
    return get_row(session, Image, image_id, "image", lock)


def find_image(session, owner_id, ref, where):
    """A DISK's image: IMAGE_ID (any owner's) or IMAGE (a name among the VM owner's)."""
    if ref.get("IMAGE_ID") not in (None, ""):
        raw = str(ref["IMAGE_ID"])
        image = session.get(Image, int(raw)) if is_digits(raw) else None
        if image is None:
            raise NotFound(f"{where} IMAGE_ID: image {raw!r} does not exist")
        return image
    image = session.scalar(select(Image).where(Image.owner_id == owner_id,
                                               Image.name == str(ref["IMAGE"])))
    if image is None:
        raise NotFound(f"{where} IMAGE: image {ref['IMAGE']!r} does not exist")
    return image


def set_persistent(session, image_id, persistent):
    image = get_image(session, image_id, lock=True)
    users = image_users(session, image.id)
    if users and image.persistent != bool(persistent):
        raise FailedPrecondition(f"image {image.name!r} is used by VMs "
                                 f"{', '.join(map(str, users))}; change it when it is READY")
    image.persistent = bool(persistent)
    return image


def delete_image(session, image_id):
    """Forget an image; refused while VMs use it or while it is being saved.
    The file stays where it was registered from."""
    image = get_image(session, image_id, lock=True)   # waits for deploys taking it
    out = image_to_dict(session, image)
    if out["vms"]:
        raise FailedPrecondition(f"image {image.name!r} is used by VMs "
                                 f"{', '.join(map(str, out['vms']))}; terminate them first")
    if image.state == "LOCKED":
        raise FailedPrecondition(f"image {image.name!r} is LOCKED: VM {image.saved_from_vm_id} "
                                 "has not saved its disk into it yet")
    session.delete(image)
    return out


def list_images(session, owner_id=None):
    query = select(Image, User.name).join(User, User.id == Image.owner_id).order_by(Image.id)
    if owner_id is not None:
        query = query.where(Image.owner_id == owner_id)
    return [image_to_dict(session, image, owner) for image, owner in session.execute(query)]


# ---------------------------------------------------------------- images of VMs

# FOR KEY SHARE reads the image as it is once a persistency change commits
USE = text("""
    INSERT INTO image_users (image_id, vm_id, exclusive)
    SELECT id, :vm, persistent FROM images WHERE id = :image AND state = 'READY' FOR KEY SHARE
    ON CONFLICT (image_id) WHERE exclusive DO NOTHING
    RETURNING image_id""")


def use_image(session, image, vm_id):
    """Count VM ``vm_id`` as a user of ``image``; ImageBusy when it cannot be."""
    if session.execute(USE, {"image": image.id, "vm": vm_id}).first() is not None:
        return
    session.refresh(image)
    if image.state != "READY":
        raise ImageBusy(f"image {image.name!r} is {image.state}")
    users = [u for u in image_users(session, image.id) if u != vm_id]
    raise ImageBusy(f"persistent image {image.name!r} is used by VM {users[0] if users else '?'}")


def save_as_image(session, source, vm, name, where):
    """The LOCKED image a disk is saved into when its VM terminates (SAVE_AS)."""
    name = check_new_name(session, vm.owner_id, name, f"{where} SAVE_AS")
    ds = session.get(Datastore, source.datastore_id)
    image = Image(name=name, owner_id=vm.owner_id, datastore_id=ds.id,
                  path=os.path.join(ds.path, f"{uuid.uuid4().hex}.{source.format}"),
                  format=source.format, size_mb=source.size_mb, state="LOCKED",
                  persistent=False, saved_from_vm_id=vm.id)
    session.add(image)
    session.flush()
    return image


def forget_vm(session, vm_id):
    """Undo what a deploy that cannot finish took: its uses and SAVE_AS images."""
    session.execute(text("DELETE FROM image_users WHERE vm_id = :vm"), {"vm": vm_id})
    session.execute(text("DELETE FROM images WHERE saved_from_vm_id = :vm AND state = 'LOCKED'"),
                    {"vm": vm_id})


def release_images(session, vm_id, saved_paths):
    """A VM is done with its images; SAVE_AS images it filled become READY,
    the ones it did not ERROR."""
    session.execute(text("DELETE FROM image_users WHERE vm_id = :vm"), {"vm": vm_id})
    for image in session.scalars(select(Image).where(Image.saved_from_vm_id == vm_id,
                                                     Image.state == "LOCKED")):
        if image.path in saved_paths:
            image.state = "READY"
        else:
            image.state = "ERROR"
            image.error = f"VM {vm_id} ended without saving its disk to {image.path}"
