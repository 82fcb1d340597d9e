"""`[[disk]] backend = "vhost-user"`: a socket someone else runs, or a daemon ptmig spawns; every
mistake is refused with the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptmig.config import ConfigError, parse_config

BASE = (
    '[vm]\nmemory = "64M"\nvcpus = 1\n\n[workload]\nname = "hello"\n\n[[disk]]\nid = "d0"\n'
    'path = "d.img"\nsize = "16M"\n'
)


def _disk(extra: str) -> str:
    return BASE + extra


def test_a_spawned_backend_and_a_socket_backend_parse() -> None:
    spawned = parse_config(
        _disk('backend = "vhost-user"\nspawn = "qemu-storage-daemon"\n'), base_dir=Path("/vm")
    ).disk[0]
    assert (spawned.backend, spawned.spawn, spawned.socket) == (
        "vhost-user",
        "qemu-storage-daemon",
        None,
    )
    sock = parse_config(
        _disk('backend = "vhost-user"\nsocket = "run/vub.sock"\n'), base_dir=Path("/vm")
    ).disk[0]
    assert (sock.backend, sock.socket, sock.spawn) == ("vhost-user", Path("/vm/run/vub.sock"), None)
    plain = parse_config(BASE, base_dir=Path("/vm")).disk[0]
    assert (plain.backend, plain.socket, plain.spawn) == ("builtin", None, None)


@pytest.mark.parametrize(
    ("extra", "key", "fragment"),
    [
        ('backend = "vhost-user"\n', "disk[0].backend", "exactly one of socket"),
        (
            'backend = "vhost-user"\nsocket = "a"\nspawn = "qemu-storage-daemon"\n',
            "disk[0].backend",
            "exactly one of socket",
        ),
        ('backend = "vhost-user"\nspawn = "spdk"\n', "disk[0].spawn", "'spdk' is not allowed"),
        ('backend = "vhost-user"\nsocket = ""\n', "disk[0].socket", "must not be empty"),
        ('backend = "vfio"\n', "disk[0].backend", "'vfio' is not allowed"),
        ('socket = "a.sock"\n', "disk[0].socket", 'only meaningful with backend = "vhost-user"'),
        (
            'backend = "builtin"\nspawn = "qemu-storage-daemon"\n',
            "disk[0].spawn",
            "only meaningful",
        ),
        ("backend = 3\n", "disk[0].backend", "must be a string"),
    ],
)
def test_mistakes_are_refused_with_key_and_reason(extra: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_disk(extra), base_dir=Path("/vm"))
    assert key in str(err.value) and fragment in str(err.value), str(err.value)
