"""The network outside the guest: frames, backends, the UDP learning switch, the kv client.

- `frames`: build and parse Ethernet II, ARP, IPv4, UDP and ICMP echo (pure functions).
- `kvproto`: the wire format of the guest's UDP key-value service.
- `switchproto`: the control datagrams spoken between backends and the switch.
- `backend`: `open_backend("udp:HOST:PORT" | "tap:IFNAME")`, what a virtio-net device sends
  frames through.
- `tap`: the TAP backend (`tap:IFNAME`).
- `fdb`: the switch's forwarding database (learning, flooding, moving, aging; pure logic).
- `switch`: the learning L2 switch over UDP (`switch_main`, `ensure_switch`).
- `hoststack`: a minimal Ethernet/ARP/IPv4/UDP host, so a client can sit on the switch.
- `kvload`: the kv load engine behind `ptmig load` (`ptmig/load.py`).
"""
