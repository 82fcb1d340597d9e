"""The QMP control socket: a QEMU Machine Protocol server on a unix socket, in three layers.

The package owns the wire protocol (greeting, capabilities negotiation, request checking, ``id``
echoing, error replies, timestamped events), argument checking against a small per-command
schema, and the server thread. It owns no VM state: the VMM registers its commands
(``query-status``, ``stop``, ``cont``, ``migrate``...) as plain callables and calls
``QmpServer.emit`` for events. Existing QMP clients (``qemu.qmp``, ``qmp-shell``, libvirt's
monitor code) can drive ptmig through it.

Layers, pure first:

- ``stream``: ``JsonSplitter`` cuts the unframed input stream into JSON texts (no I/O).
- ``session``: ``check_arguments`` and ``QmpSession`` turn one text into either a ready reply
  or a ``Call`` to run (no I/O).
- ``server``: ``QmpServer`` is the I/O shell: a selector loop in its own thread (the VMM's vCPU
  threads block in KVM_RUN) accepts clients; handlers run in a worker pool so a slow command
  does not stall other clients; each client's commands are answered in the order it sent them.

Differences from QEMU, on purpose: no out-of-band execution (the greeting offers no ``oob``), no
single-quoted-string JSON extension, and a request longer than the cap (1 MiB) gets an error
reply and a disconnect (there is no way to resynchronise inside it).
"""
