#!/usr/bin/python3
"""Independent oracle for layer tests: list a (possibly compressed) layer tar
with Python's tarfile, one JSON object per member, xattr values as hex bytes.
Usage: tarlist.py BLOB"""
import json, sys, tarfile

TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
         tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}

def open_any(path):
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        import subprocess, io
        data = subprocess.run(["zstd", "-dc", path], check=True, stdout=subprocess.PIPE).stdout
        return tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape")
    return tarfile.open(path, mode="r:*", encoding="utf-8", errors="surrogateescape")

with open_any(sys.argv[1]) as tf:
    for m in tf:
        xattrs = {}
        for k, v in m.pax_headers.items():
            if k.startswith("SCHILY.xattr."):
                raw = v.encode("utf-8", "surrogateescape")
                xattrs[k[len("SCHILY.xattr."):]] = raw.hex()
        print(json.dumps({"name": m.name, "type": TYPES.get(m.type, m.type.decode() if isinstance(m.type, bytes) else str(m.type)),
                          "mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid, "size": m.size if m.isreg() else 0,
                          "linkname": m.linkname, "devmajor": m.devmajor, "devminor": m.devminor, "xattrs": xattrs}))
