"""Transfer actions on a node's files, as OpenNebula's TM scripts do them.

Each disk of a VM (backend.disk_specs) becomes ``<vm_dir>/disk.<id>``:

- clone "overlay": a qcow2 file whose backing file is the image;
- clone "copy": a sparse full copy of the image;
- clone "ln": nothing is made, the image itself is the disk (a persistent
  image); it is never deleted;
- type "swap": a sparse file of size_mb, formatted by mkswap;
- type "fs": a sparse raw file of size_mb, formatted ext4 when mkfs.ext4 is
  there (a blank volatile disk otherwise).

A file disk with size_mb is grown to it (never shrunk). Each file is written
as ``<file>.part`` and renamed when complete, so a half-made disk is never
taken for a done one, and a disk already there is left alone: a redelivered
clone does no work twice. Template disks without "clone" (the old DISK
SOURCE/PATH) get an overlay when the image is qcow2 and a copy otherwise.

SAVE_AS copies a disk, flattened by ``qemu-img convert`` into the image's
format, to its save_as path (again through a ``.part`` file). A save_as path
that already exists is taken as saved already and never overwritten.
"""
import logging
import os
import shutil
import subprocess

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"
MB = 1024 * 1024


def disk_path(vm_dir, index):
    """Where clone puts DISK ``index`` (OpenNebula's disk.<DISK_ID>)."""
    return os.path.join(vm_dir, f"disk.{index}")


def disk_file(vm_dir, disk):
    """The file the domain uses for ``disk``: the image itself for ln."""
    if disk.get("clone") == "ln":
        return disk["source"]
    return disk_path(vm_dir, disk["id"])


def declared_format(disk):
    """The format of the disk's file as the spec says, or None for a template
    disk (whose file tells). Trusting the spec, not the file's first bytes,
    keeps a guest that writes a qcow2 header on a raw disk from changing it."""
    if disk["type"] in ("swap", "fs"):
        return "raw"
    if disk.get("clone") == "overlay":
        return "qcow2"
    return disk.get("format")


def image_format(path):
    with open(path, "rb") as image:
        return "qcow2" if image.read(4) == QCOW2_MAGIC else "raw"


def run(where, what, command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{where}: could not {what}: "
                           f"{done.stderr.strip() or done.stdout.strip()}")


def tool(where, name):
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{where}: {name} is not installed on this node")
    return path


def check_source(where, source):
    if not os.path.exists(source):
        raise FileNotFoundError(f"{where}: source {source} does not exist")
    if not os.path.isfile(source):
        raise ValueError(f"{where}: source {source} is not a file")


def make_disk(vm_dir, disk):
    """Make ``disk`` for the VM in ``vm_dir``; returns the path the domain uses."""
    where = f"DISK {disk['id']}"
    if disk["type"] == "file":
        check_source(where, disk["source"])
    path = disk_file(vm_dir, disk)
    if disk.get("clone") == "ln" or os.path.exists(path):
        return path
    partial = path + ".part"
    try:
        _write_disk(where, disk, partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def _write_disk(where, disk, partial):
    source, size_mb = disk.get("source"), disk.get("size_mb")
    if disk["type"] in ("swap", "fs"):
        with open(partial, "wb") as f:
            f.truncate(size_mb * MB)
        if disk["type"] == "swap":
            run(where, "make swap", [tool(where, "mkswap"), "-q", partial])
        elif shutil.which("mkfs.ext4"):
            run(where, "make an ext4 file system", ["mkfs.ext4", "-q", "-F", partial])
        return
    clone = disk.get("clone")
    source_format = disk.get("format") or image_format(source)
    if clone == "overlay" or (clone is None and source_format == "qcow2"
                              and shutil.which("qemu-img")):
        run(where, f"make an overlay of {source}",
            [tool(where, "qemu-img"), "create", "-q", "-f", "qcow2",
             "-F", source_format, "-b", os.path.abspath(source), partial])
        made_format = "qcow2"
    else:
        run(where, f"copy {source}", ["cp", "--sparse=always", source, partial])
        made_format = source_format
    if size_mb:
        run(where, f"grow the disk to {size_mb} MB",
            [tool(where, "qemu-img"), "resize", "-q", "-f", made_format, partial,
             f"{size_mb}M"])


def save_disk(vm_dirs, disk):
    """SAVE_AS: copy ``disk`` (found in the first of ``vm_dirs`` holding it) to
    its save_as path. Returns True when save_as holds the disk, False when
    there was no disk to save (clone never made it)."""
    where = f"DISK {disk['id']}"
    save_as = disk["save_as"]
    if os.path.exists(save_as):
        return True
    found = [disk_file(vm_dir, disk) for vm_dir in vm_dirs]
    path = next((p for p in found if os.path.isfile(p)), None)
    if path is None:
        log.warning("%s: nothing to save as %s, no file at %s", where, save_as,
                    " nor ".join(found))
        return False
    partial = save_as + ".part"
    os.makedirs(os.path.dirname(save_as), exist_ok=True)
    try:
        run(where, f"save {path} as {save_as}",
            [tool(where, "qemu-img"), "convert", "-q",
             "-f", declared_format(disk) or image_format(path),
             "-O", disk.get("format") or "raw", path, partial])
        os.replace(partial, save_as)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return True
