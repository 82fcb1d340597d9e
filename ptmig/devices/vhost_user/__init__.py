"""ptmig as a vhost-user frontend: devices that run in a backend process nobody here wrote.

`codec` turns vhost-user messages into bytes and back (no I/O), `connection` carries them over a
unix socket with SCM_RIGHTS, `frontend` is the VMM's side of one vhost-user-blk device (its
virtio-mmio register file, the memory table, the rings, the backend's dirty log) and `daemon`
starts and supervises a `qemu-storage-daemon` to be its backend.
"""
