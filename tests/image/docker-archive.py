#!/usr/bin/env python3
"""Writes a docker-archive image tarball (what `docker save` writes and
`ctr images import` reads) from a root filesystem directory, with no Docker:
manifest.json, a config JSON whose rootfs.diff_ids names the one layer, and
the layer as an uncompressed tar.

Reproducible: entries sorted, every mtime fixed (SOURCE_DATE_EPOCH, default
0), owners from --owner (default root), no user or group names. The same
inputs give the same bytes, hence the same image ID.

  docker-archive.py --rootfs DIR --tag NAME:TAG --out FILE.tar
      [--user UID:GID] [--entrypoint JSON] [--cmd JSON] [--env K=V]...
      [--expose PORT/tcp]... [--owner PATH=UID:GID]...
"""
import argparse
import hashlib
import io
import json
import os
import tarfile
import time


def layer_bytes(rootfs, mtime, owners):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for top, dirs, files in os.walk(rootfs):
            dirs.sort()
            for name in sorted(dirs + files):
                paths.append(os.path.join(top, name))
        for path in sorted(paths, key=lambda p: os.path.relpath(p, rootfs)):
            rel = os.path.relpath(path, rootfs)
            info = tar.gettarinfo(path, arcname=rel)
            info.mtime = mtime
            info.uid, info.gid = owners.get("/" + rel, (0, 0))
            info.uname = info.gname = ""
            info.pax_headers = {}
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return out.getvalue()


def add_bytes(tar, name, data, mtime):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rootfs", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--user", default="")
    p.add_argument("--entrypoint", default="null")
    p.add_argument("--cmd", default="null")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--expose", action="append", default=[])
    p.add_argument("--owner", action="append", default=[])
    a = p.parse_args()
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    owners = {}
    for spec in a.owner:
        path, ids = spec.split("=", 1)
        uid, gid = ids.split(":", 1)
        owners[path] = (int(uid), int(gid))

    layer = layer_bytes(a.rootfs, mtime, owners)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)),
        "config": {
            "User": a.user,
            "Env": a.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": json.loads(a.entrypoint),
            "Cmd": json.loads(a.cmd),
            "WorkingDir": "/",
            "ExposedPorts": {port: {} for port in a.expose} or None,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "tests/image/docker-archive.py"}],
    }
    config["config"] = {k: v for k, v in config["config"].items() if v not in (None, "")}
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id.split(":", 1)[1] + "/layer.tar"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [a.tag], "Layers": [layer_name]}],
        separators=(",", ":"),
    ).encode()

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        add_bytes(tar, config_name, config_bytes, mtime)
        add_bytes(tar, layer_name, layer, mtime)
        add_bytes(tar, "manifest.json", manifest, mtime)
    os.replace(tmp, a.out)
    print(config_name.split(".")[0])


if __name__ == "__main__":
    main()
